"""One entry per training method, each read top to bottom: sft (and lora), pretrain, dpo; and
prepare, which tokenizes into the cache and shows the pre-flight check without training."""
