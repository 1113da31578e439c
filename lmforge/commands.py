"""lmforge's commands: the module that runs each, and its one-line description (`lmforge` lists
them; `cli.py` dispatches to them; `flag_help.py` heads their --help with them)."""

COMMANDS = {
    "sft": ("lmforge.sft", "supervised fine-tuning on chat data (full, or --lora / --q_lora)"),
    "lora": ("lmforge.lora", "sft with LoRA on (FastChat's train_lora.py command lines)"),
    "dpo": ("lmforge.dpo", "preference training (DPO / IPO / hinge) on chosen / rejected pairs"),
    "grpo": ("lmforge.grpo", "online RL with verifiable rewards (GRPO / DAPO / Dr. GRPO) on prompts"),
    "pretrain": ("lmforge.pretrain", "causal-LM pretraining on text, from a config or from weights"),
    "tokenizer": ("lmforge.tokenizer", "`lmforge tokenizer train`: a byte-level BPE tokenizer from text"),
    "merge": ("lmforge.export", "merge a LoRA adapter into its base model"),
    "prepare": ("lmforge.prepare", "tokenize data into the cache; print counts; --dump / --show records"),
    "report": ("lmforge.report", "`lmforge report DIR`: rebuild DIR/report.md (curves, data, throughput)"),
    "chat": ("lmforge.chat", "generate with a trained model through its chat template"),
    "demo": ("lmforge.demo", "build a tiny chat model end to end on CPU and measure it"),
}
