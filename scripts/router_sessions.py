"""Multi-turn sessions through SGLang's router (cache-aware policy) in front of two
`--kv-compression tangram` servers: does each follow-up turn reach the replica holding its
compressed history? Prints cached tokens per turn and each replica's free group slots.

    python scripts/router_sessions.py   (router on :30700, workers on :30701 and :30702;
    recipe and recorded run in bench/results/router-2026-12-06-cpu.md)
"""

import random

import requests

url = "http://127.0.0.1:30700"
WORDS = (
    "river",
    "stone",
    "light",
    "field",
    "cloud",
    "metal",
    "garden",
    "winter",
    "signal",
    "harbor",
)
out = []
for s in range(4):
    rng = random.Random(s)
    hist = " ".join(rng.choice(WORDS) for _ in range(150))
    for t in range(3):
        r = requests.post(
            url + "/generate",
            json={
                "text": hist,
                "sampling_params": {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True},
            },
            timeout=300,
        ).json()
        m = r["meta_info"]
        out.append((s, t, m["prompt_tokens"], m["cached_tokens"]))
        hist = hist + r["text"] + " " + " ".join(rng.choice(WORDS) for _ in range(20))
for s, t, prompt, cached in out:
    print(f"session {s} turn {t} prompt {prompt} cached {cached}")
for port in (30701, 30702):
    st = requests.get(f"http://127.0.0.1:{port}/server_info").json()["internal_states"][0][
        "tangram_pool"
    ]
    print(port, "free", st["free_slots"], "of", st["slots"])
