"""Tokenize the training corpus once, ahead of training: the data pipeline's CLI (`data.prepare`) with the
embedded model's tokenizer as the default, which the data layer itself cannot reach.

    python prepare.py                                        # the embedded stdlib corpus, embedded tokenizer
    python prepare.py --config conf/data/files.yaml --num-proc 16
    python prepare.py --source /data/books/ --out /data/books.tok --tokenizer /models/llama
"""
import sys
from typing import Optional

from data.prepare import local_tokenizer, main


def _tokenizer(path: Optional[str]):
    if path is not None:
        return local_tokenizer(path)
    from infllm.config import ModelConfig
    from infllm.model import load_tokenizer

    return load_tokenizer(ModelConfig())


if __name__ == "__main__":
    sys.exit(main(load_tokenizer=_tokenizer, prog="python prepare.py"))
