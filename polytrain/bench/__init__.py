"""Timing statistics, experiment runners, reports and the demo."""
