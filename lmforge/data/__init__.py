"""The data chain: files in, the batches the model step takes out. One module per stage, in order;
a stage imports only the stages before it (tests/test_layout.py checks).

    1 sources.py    files → raw records (or text documents), each with its location
                    (also: the bad-record policy, LLaMA-Factory's dataset_info.json, --tools files)
    2 records.py    raw record → Conversation (SFT) or Pair (DPO), checked
      schema.py     the messages of a record: roles, content parts, reasoning, tool calls, flags
    3 render.py     Conversation → Rendered (input_ids, labels): the loss mask on the rendered text
      templates.py  the chat template a run renders with (the tokenizer's own, or a built-in)
      text_spans.py       render's pure string work: prefixes, turn spans, openers and closers
      template_probes.py  what a template does: compiled, its traits, the tool-call form it writes
      token_spans.py      characters → tokens: offsets, a span's tokens
    4 store.py      rows → a content-keyed, memory-mapped token-cache entry (complete or absent)
    5 encode.py     the prepare driver: read (1) → check + render (2, 3) in worker processes →
                    length policy → rows into the store (4); one driver for every kind of record
                    (CHAT, PAIRS, TEXT)
    6 pack.py       cached rows → packed rows (SFT) or document-masked blocks (pretraining)
    7 collate.py    rows → a padded batch with what the model step needs (positions, offsets)

    batches.py      the one entry for every method: `prepare_data` (stages 1-5 for the train and
                    eval files) and `build_batches` (6-7: datasets + collator for the Trainer)
    options.py      the user's choices about the data (one type per flag), read by every stage
    split.py        --val_split and per-row counts from the Arrow offsets; sampler.py: row order
"""
