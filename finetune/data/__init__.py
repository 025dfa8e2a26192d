"""Data: reading a task's files or hub dataset into examples (sources), the data stage that validates,
splits and renders them (prepare), and the split files every later stage reads (rows)."""
