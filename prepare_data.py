"""Tokenize a corpus into uint16 token shards for train_gpt2.py (not implemented yet)."""
import sys

if __name__ == "__main__":
    sys.exit("error: prepare_data.py is not implemented yet")
