"""Accuracy on a real model: task generators, the reference path, the server path."""
