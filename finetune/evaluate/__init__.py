"""The evaluate stage (stage), the files it writes (metrics), the report made from them (report, plots),
and `finetune-compare` across runs (compare)."""
