"""Feedback: LLM-as-judge verdicts and AI labelling."""
