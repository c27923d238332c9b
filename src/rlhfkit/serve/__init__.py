"""Serving: the HTTP reward server (``rlhfkit serve reward``) and the OpenAI-compatible policy server
(``rlhfkit serve policy``)."""
