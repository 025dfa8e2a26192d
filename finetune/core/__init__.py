"""Foundations every other part of finetune builds on: the config schema, the run directory and its file
names, ranks, the cache and its locks, atomic file writes, typed errors. Imports nothing else of ours."""
