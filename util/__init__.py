"""Plumbing shared by the scripts: files, flags, device and processes, run folders, metrics."""
