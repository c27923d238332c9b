"""Serving: the HTTP reward server (``rlhfkit serve reward``)."""
