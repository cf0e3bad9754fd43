"""Special token ids shared by every tokenizer and model in vlcore (ids 0..6 are reserved in this order)."""

PAD, BOS, EOS, MASK, CLS, SEP, UNK = range(7)
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>", "<cls>", "<sep>", "<unk>")
NUM_SPECIAL = len(SPECIAL_TOKENS)
