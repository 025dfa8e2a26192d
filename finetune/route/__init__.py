"""Routing between the fine-tuned small model and a strong one (finetune.route.stage builds router.json;
`python -m finetune.route` / `finetune-route` serves it)."""
