"""Sparrow's training side: data from the target (gen-data), the IVSB + MTP trainer, evaluation.

    records.py   the dataset format (JSONL or in-memory records) and the processor hook
    shards.py    training data on disk: safetensors shards + index.json, checked on read
    datagen.py   `sparrow gen-data`: the target answers and its features are stored
    trainer.py   `sparrow train`: IVSB + MTP, checkpoints, bit-exact resume
    evaluate.py  `sparrow eval`: acceptance, DSR / ESR, tokens/s against autoregressive decoding
"""
