"""Measurement that every run reports: energy (`energy`) and memory, as a device peak and an exact tensor account
(`memory`)."""
