"""Writes the SentencePiece `tokenizer.model` of a Llama GGUF vocabulary with the sentencepiece
package's own protobuf classes (as Llama-2's is: BPE, byte fallback, unk/bos/eos 0/1/2, the
identity normalizer with a dummy prefix and no whitespace folding), then encodes texts with
SentencePiece itself.

    write_tokenizer_model.py VOCAB.gguf OUT.model TEXTS.inp

Prints one line of SentencePiece's ids per text of TEXTS.inp (llama.cpp's test-vector format),
so a test can hold the Rust tokenizer to the library that defines the format, and to llama.cpp.
"""
import sys

import gguf
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb


def field(reader, key):
    f = reader.fields[key]
    return [f.parts[i] for i in f.data]


def main():
    vocab, out, texts = sys.argv[1:4]
    r = gguf.GGUFReader(vocab)
    tokens = [bytes(t).decode() for t in field(r, "tokenizer.ggml.tokens")]
    scores = [float(s[0]) for s in field(r, "tokenizer.ggml.scores")]
    types = [int(t[0]) for t in field(r, "tokenizer.ggml.token_type")]
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for text, score, kind in zip(tokens, scores, types):
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    data = m.SerializeToString()
    with open(out, "wb") as f:
        f.write(data)
    sp = spm.SentencePieceProcessor(model_proto=data)
    for text in open(texts, encoding="utf-8").read().split("\n__ggml_vocab_test__\n"):
        print(" ".join(str(i) for i in sp.encode(text)))


if __name__ == "__main__":
    main()
