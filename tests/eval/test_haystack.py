"""The eval's stdlib text is the training corpus's: one reader (data.sources), the same files and the same text,
taken from the other end of the alphabet."""
from data.config import SourceConfig
from data.sources import BadDocuments, iter_documents, resolve_source, stdlib_documents_index
from infllm.eval.haystack import _stdlib_package_documents, text_haystack


class CodepointTokenizer:
    """One token per character (its code point): a document's tokens give its text back exactly."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _training_text(name):
    src = resolve_source(SourceConfig(kind="stdlib", include=[name]))
    [(text, where)] = list(iter_documents(src, BadDocuments("error", "stdlib")))
    assert where == f"stdlib:{name}"
    return text


def test_haystack_stdlib_documents_are_the_training_documents():
    names = [name for name, _ in stdlib_documents_index()]
    docs = _stdlib_package_documents(CodepointTokenizer())
    for name in reversed(names[-3:]):  # the last documents of the alphabet come first
        assert "".join(map(chr, next(docs))) == _training_text(name)
    # A multi-file package carries the corpus's per-file headers.
    package = next(name for name, files in reversed(stdlib_documents_index()) if len(files) > 1)
    assert _training_text(package).startswith(f"# file: {package}/")


def test_text_haystack_boundaries_are_line_ends(tokenizer):
    docs = [tokenizer("def f():\n    return 1\n\nx = 2\n", add_special_tokens=False)["input_ids"]]
    hay = text_haystack(tokenizer, docs)
    assert hay.boundaries[0] == 0 and hay.boundaries[-1] == len(hay.tokens)
    for b in hay.boundaries[1:-1]:
        assert tokenizer.decode([hay.tokens[b]]).startswith("\n")
