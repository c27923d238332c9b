"""One file per stage, each with its loop visible top to bottom."""
