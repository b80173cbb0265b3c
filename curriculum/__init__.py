"""Difficulty signals and pacing functions that order training examples from easy to hard."""
