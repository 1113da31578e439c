"""One entry per training method, each read top to bottom: prepare (tokenize only), sft."""
