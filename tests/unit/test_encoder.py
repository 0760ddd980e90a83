"""The embedding model against references nobody here wrote: sentence-transformers and transformers.

- all-MiniLM-L6-v2 (the real model, `tests.fixtures_minilm`; skipped when it cannot be had
  locally): token ids equal sentence-transformers' for awkward text, with truncation and
  without; embeddings of texts up to and past the model's limit have cosine >= 0.99999 with
  `SentenceTransformer.encode`, and a text's embedding does not depend on its batch or on
  how the batch is grouped for attention.
- Random-weight BERT checkpoints of other shapes, made here with transformers: embeddings
  equal `BertModel`'s with the checkpoint's pooling; one saved by
  sentence-transformers itself (the installed version's layout) equals its `encode`.
- Refusals: every way a directory can be unservable is an EncoderCheckpointError naming it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures_minilm import MiniLMUnavailable, minilm_dir
from worker.model.checkpoint import CheckpointError
from worker.model.embed_checkpoint import (EncoderCheckpointError, TextTooLong,
                                           is_encoder_checkpoint, load_encoder)
from worker.model.encoder import finish

transformers = pytest.importorskip("transformers")

CPU = torch.device("cpu")
COSINE = 0.99999
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "embedding", "vector",
         "café", "naïve", "Zürich", "résumé", "東京", "中文", "日本語", "한국어", "😀", "👍🏽",
         "Ελληνικά", "Русский", "العربية", "हिन्दी", "don't", "state-of-the-art", "1234.5",
         "CamelCase", "snake_case", "e-mail@example.com", "ﬁ", "ＡＢＣ", "\u00a0", "tab\there"]
AWKWARD = ["hello world", "Café naïve résumé Zürich", "中文字符测试 日本語のテキスト 한국어",
           "emoji 😀👍🏽 🇫🇷 👨‍👩‍👧", "", " ", "\t\n  \u3000", "\u2028\x1c\x85 \u200b",
           "\x00\x01 control", "[CLS] [SEP] [MASK] [PAD] [UNK]", "ＦＵＬＬ ｗｉｄｔｈ",
           "Ελληνικά Русский العربية עברית हिन्दी ไทย", "a" * 300, "word " * 300,
           "🙂" * 400, "naïve " * 255, "x" + " y" * 253, "x" + " y" * 254]


def texts_of(n_words: list[int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in n_words]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


# --- all-MiniLM-L6-v2 against sentence-transformers ------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> Path:
    try:
        return minilm_dir()
    except MiniLMUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference(minilm: Path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(minilm), device="cpu")


@pytest.fixture(scope="module")
def ours(minilm: Path):
    return load_encoder(minilm, torch.float32, CPU)


def st_ids(reference, texts: list[str]) -> list[list[int]]:
    """sentence-transformers' ids (what `encode` feeds the model), padding removed."""
    prep = getattr(reference, "preprocess", None) or reference.tokenize  # `tokenize` before 6.0
    out = prep(texts)
    return [row[mask.bool()].tolist() for row, mask in zip(out["input_ids"], out["attention_mask"])]


def test_minilm_info(ours, reference) -> None:
    assert ours.info.max_seq_len == reference.max_seq_length == 256
    dim = getattr(reference, "get_embedding_dimension", None)  # renamed in sentence-transformers 6
    assert ours.info.dim == (dim or reference.get_sentence_embedding_dimension)() == 384
    assert (ours.info.normalize, ours.info.pooling) == (True, "mean")


def test_token_ids_equal_sentence_transformers(ours, reference) -> None:
    texts = AWKWARD + texts_of([1, 7, 40, 130, 400], seed=1)
    got = ours.tokenizer.encode_batch(texts, truncate=True)
    assert [e.ids for e in got] == st_ids(reference, texts)
    full = [reference.tokenizer(t, truncation=False)["input_ids"] for t in texts]
    assert [e.truncated for e in got] == [len(f) > 256 for f in full]
    assert sum(e.truncated for e in got) >= 4 and len(got[-1].ids) == 256  # the cut was tested
    exact, one_over = (ours.tokenizer.encode(t, truncate=True) for t in AWKWARD[-2:])
    assert (len(exact.ids), exact.truncated, len(one_over.ids), one_over.truncated) == \
        (256, False, 256, True)


def test_too_long_without_truncation_is_refused(ours, reference) -> None:
    long = "word " * 300
    with pytest.raises(TextTooLong) as err:
        ours.tokenizer.encode(long, truncate=False)
    assert (err.value.num_tokens, err.value.max_tokens) == (302, 256)
    assert "302 tokens" in str(err.value)
    with pytest.raises(TextTooLong):
        ours.tokenizer.encode_batch(["short", long], truncate=False)
    exact = "x" + " y" * 253  # 254 words + [CLS] + [SEP]
    assert ours.tokenizer.encode(exact, truncate=False).ids == st_ids(reference, [exact])[0]


@pytest.fixture(scope="module")
def corpus(ours) -> tuple[list[str], list[list[int]]]:
    """Texts of 2..256 tokens and some far past the limit (cut to it), in random order."""
    # A word is ~2.5 tokens: texts of 2..256 tokens, and two far past the limit.
    n_words = [0, 1, 2, 3, 5, 8, 13, 21, 30, 40, 50, 60, 70, 80, 90, 100, 200, 400]
    rng = random.Random(7)
    texts = texts_of(n_words + [rng.randint(1, 110) for _ in range(22)], seed=2)
    random.Random(3).shuffle(texts)
    ids = [e.ids for e in ours.tokenizer.encode_batch(texts, truncate=True)]
    lengths = sorted(map(len, ids))
    assert lengths[0] <= 3 and lengths[-1] == 256 and len(set(lengths)) > 25
    return texts, ids


def test_embeddings_match_sentence_transformers(ours, reference, corpus) -> None:
    texts, ids = corpus
    want = reference.encode(texts, convert_to_tensor=True)
    got = ours.model.embed(ids)
    assert got.dtype == torch.float32 and got.shape == (len(texts), 384)
    assert cosines(got, want).min() >= COSINE
    # Different texts embed differently: a broken model that made one vector would not pass.
    assert cosines(got[:-1], got[1:]).min() < 0.95


def test_an_embedding_does_not_depend_on_its_batch(ours, corpus) -> None:
    _, ids = corpus
    embed = ours.model.embed
    alone = torch.cat([embed([s]) for s in ids])
    rng = random.Random(4)
    n = len(ids)
    for trial in range(4):
        pick = rng.sample(range(n), rng.randint(2, n))
        got = embed([ids[i] for i in pick])
        assert (got - alone[pick]).abs().max() < 1e-5, trial
    # The same batch under other groupings: all in one padded call, each alone, random groups.
    shuffled = list(range(n))
    rng.shuffle(shuffled)
    groupings = [[list(range(n))], [[i] for i in range(n)],
                 [shuffled[:5], shuffled[5:6], shuffled[6:20], shuffled[20:]]]
    for groups in groupings:
        assert (embed(ids, groups) - alone).abs().max() < 1e-5


# --- random-weight checkpoints of other shapes, against transformers --------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "quick", "fox",
         "Hello", "World", "##s", "##ing", ".", ","]
# id: (BertConfig overrides, pooling, normalize)
CASES = {
    "bert-mean-normalized": (dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                  intermediate_size=128), "mean", True),
    "bert-cls-3-types": (dict(num_hidden_layers=3, num_attention_heads=2, hidden_size=48,
                              intermediate_size=96, type_vocab_size=3), "cls", False),
    "bert-last-gelu-tanh": (dict(num_hidden_layers=1, num_attention_heads=8, hidden_size=64,
                                 intermediate_size=256, hidden_act="gelu_new",
                                 layer_norm_eps=1e-5), "lasttoken", True),
    "bert-mean-1-type": (dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                              intermediate_size=64, type_vocab_size=1), "mean", False),
}


def write_tokenizer(d: Path, lowercase: bool = True) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(d / "tokenizer.json"))


def random_model(seed: int, **over) -> torch.nn.Module:
    """Unit-scale random weights: HF's 0.02 init makes every embedding nearly the same."""
    cfg = dict(vocab_size=100, max_position_embeddings=66, attn_implementation="eager") | over
    model = transformers.BertModel(transformers.BertConfig(**cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * 2)
    return model.eval()


def write_checkpoint(d: Path, model: torch.nn.Module, pooling: str, normalize: bool,
                     max_seq_length: int | None = None) -> Path:
    """A sentence-transformers directory in the layout sentence-transformers < 6 wrote."""
    model.save_pretrained(d)
    write_tokenizer(d)
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling")]
    kinds += [("2_Normalize", "Normalize")] if normalize else []
    mods = [{"idx": i, "name": str(i), "path": p, "type": f"sentence_transformers.models.{k}"}
            for i, (p, k) in enumerate(kinds)]
    (d / "modules.json").write_text(json.dumps(mods))
    (d / "1_Pooling").mkdir()
    flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "lasttoken": "pooling_mode_lasttoken"}
    (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size}
        | {flag: mode == pooling for mode, flag in flags.items()}))
    sbert = {"do_lower_case": False} | ({} if max_seq_length is None else
                                        {"max_seq_length": max_seq_length})
    (d / "sentence_bert_config.json").write_text(json.dumps(sbert))
    return d


def reference_embed(model: torch.nn.Module, seqs: list[list[int]], pooling: str,
                    normalize: bool) -> torch.Tensor:
    """transformers on a right-padded batch, pooled as sentence-transformers pools."""
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, W, dim]
    lengths = mask.sum(1)
    if pooling == "mean":
        out = (h * mask[..., None]).sum(1) / lengths[:, None]
    elif pooling == "cls":
        out = h[:, 0]
    else:
        out = h[torch.arange(len(seqs)), lengths - 1]
    return F.normalize(out, dim=-1) if normalize else out


@pytest.mark.parametrize("case", CASES)
def test_random_checkpoints_match_transformers(case: str, tmp_path: Path) -> None:
    over, pooling, normalize = CASES[case]
    model = random_model(seed=len(case), **over)
    ckpt = write_checkpoint(tmp_path, model, pooling, normalize, max_seq_length=48)
    loaded = load_encoder(ckpt, torch.float32, CPU)
    limit = 66  # max_position_embeddings: what the model computes; jobs are held to 48
    assert loaded.info.max_seq_len == 48
    assert (loaded.info.dim, loaded.info.pooling, loaded.info.normalize) == \
        (over["hidden_size"], pooling, normalize)
    rng = random.Random(5)
    seqs = [[rng.randrange(100) for _ in range(n)]
            for n in [1, 2, 3, 7, 16, 17, 30, 31, 33, 50, 63, limit] + rng.sample(range(limit), 12)]
    want = reference_embed(model, seqs, pooling, normalize)
    for groups in (None, [list(range(len(seqs)))]):
        got = loaded.model.embed(seqs, groups)
        assert cosines(got, want).min() >= COSINE, groups
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), groups
    assert cosines(want[:-1], want[1:]).min() < 0.95


def test_a_checkpoint_saved_by_sentence_transformers_matches_it(tmp_path: Path) -> None:
    """In the installed version's layout; 6.x writes module types under new paths,
    `pooling_mode`, a Normalize config, and the length limit in tokenizer_config.json."""
    st = pytest.importorskip("sentence_transformers")
    try:
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
    except ImportError:  # before 6.0
        from sentence_transformers.models import Normalize, Pooling, Transformer

    body = tmp_path / "body"
    write_checkpoint(body, random_model(11, num_hidden_layers=2, num_attention_heads=4,
                                        hidden_size=32, intermediate_size=64), "mean", False)
    ref = st.SentenceTransformer(modules=[Transformer(str(body), max_seq_length=40),
                                          Pooling(32, pooling_mode="lasttoken"), Normalize()],
                                 device="cpu")
    ref.save(str(tmp_path / "saved"))
    loaded = load_encoder(tmp_path / "saved", torch.float32, CPU)
    info = loaded.info
    assert (info.max_seq_len, info.pooling, info.normalize) == (40, "lasttoken", True)
    texts = ["hello world", "The quick fox", "hello " * 50, "fox, fox. the hellos"]
    encoded = loaded.tokenizer.encode_batch(texts, truncate=True)
    assert [e.ids for e in encoded] == st_ids(ref, texts)
    got = loaded.model.embed([e.ids for e in encoded])
    assert cosines(got, ref.encode(texts, convert_to_tensor=True)).min() >= COSINE


def test_do_lower_case_lowercases_as_sentence_transformers_does(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    d = write_checkpoint(tmp_path, random_model(3, num_hidden_layers=1,
                                                num_attention_heads=2, hidden_size=16,
                                                intermediate_size=32), "mean", True)
    write_tokenizer(d, lowercase=False)
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    texts = ["Hello World", "hello world", "HELLO the Quick fox"]
    cased = load_encoder(d, torch.float32, CPU).tokenizer.encode_batch(texts, truncate=True)
    assert cased[0].ids != cased[1].ids
    (d / "sentence_bert_config.json").write_text(json.dumps({"do_lower_case": True}))
    lowered = load_encoder(d, torch.float32, CPU).tokenizer.encode_batch(texts, truncate=True)
    assert lowered[0].ids == lowered[1].ids
    assert [e.ids for e in lowered] == st_ids(st.SentenceTransformer(str(d), device="cpu"), texts)


# --- refusals ----------------------------------------------------------------------------------

@pytest.fixture()
def good(tmp_path: Path) -> Path:
    model = random_model(1, num_hidden_layers=1, num_attention_heads=2,
                         hidden_size=16, intermediate_size=32)
    d = write_checkpoint(tmp_path / "ckpt", model, "cls", True)
    assert load_encoder(d, torch.float32, CPU).info.pooling == "cls"  # the change alone refuses
    return d


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def refusal(path: Path) -> str:
    with pytest.raises(EncoderCheckpointError) as err:
        load_encoder(path, torch.float32, CPU)
    assert isinstance(err.value, CheckpointError) and err.value.path == path
    assert str(err.value).startswith(f"{path}: ")
    return err.value.reason


@pytest.mark.parametrize("change, reason", [
    (lambda d: edit_json(d / "config.json", model_type="llama", architectures=["LlamaModel"]),
     "model_type 'llama' is not supported"),
    (lambda d: edit_json(d / "config.json", model_type="roberta"), "model_type 'roberta'"),
    (lambda d: edit_json(d / "config.json", position_embedding_type="relative_key"),
     "position_embedding_type 'relative_key'"),
    (lambda d: edit_json(d / "config.json", hidden_act="relu"), "hidden_act 'relu'"),
    (lambda d: edit_json(d / "config.json", is_decoder=True), "decoder"),
    (lambda d: edit_json(d / "1_Pooling" / "config.json", pooling_mode_cls_token=False,
                         pooling_mode_max_tokens=True), "pooling max is not supported"),
    (lambda d: edit_json(d / "1_Pooling" / "config.json", pooling_mode_mean_tokens=True),
     "pooling cls+mean is not supported"),
    (lambda d: (d / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": 16, "pooling_mode": "weightedmean"})), "pooling weightedmean"),
    (lambda d: edit_json(d / "1_Pooling" / "config.json", word_embedding_dimension=32),
     "pooling expects 32-wide"),
    (lambda d: (d / "modules.json").write_text(json.dumps(json.loads(
        (d / "modules.json").read_text())[:2] + [{"idx": 2, "name": "2", "path": "2_Dense",
                                                   "type": "sentence_transformers.models.Dense"}])),
     "modules ['Transformer', 'Pooling', 'Dense'] are not supported"),
    (lambda d: (d / "modules.json").write_text("{}"), "modules.json is not a non-empty JSON list"),
    (lambda d: (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": "query"})),
     "default prompt 'query'"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False})),
     "disagree (setting: (tokenizer.json, tokenizer_config.json)): {'lowercase': (True, False)"),
    (lambda d: (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "MPNetTokenizer"})), "tokenizer_class 'MPNetTokenizer'"),
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda d: (d / "model.safetensors").unlink(), "no *.safetensors weights"),
    (lambda d: shutil.rmtree(d / "1_Pooling"), "no 1_Pooling/config.json"),
    (lambda d: edit_json(d / "config.json", num_hidden_layers=2), "missing ['encoder.layer.1."),
    (lambda d: edit_json(d / "config.json", intermediate_size=48), "weights do not match"),
], ids=["llama", "roberta", "relative-position", "relu", "decoder", "max-pooling",
        "two-poolings", "weightedmean", "pooling-width", "dense-module", "bad-modules",
        "default-prompt", "tokenizer-disagrees", "tokenizer-class", "no-config", "no-tokenizer",
        "no-weights", "no-pooling", "missing-layer", "wrong-shape"])
def test_refusals_say_what_was_wrong(good: Path, change, reason: str) -> None:
    change(good)
    assert reason in refusal(good)


def test_only_a_sentence_transformers_directory_is_an_encoder(good: Path) -> None:
    assert is_encoder_checkpoint(good) and is_encoder_checkpoint(str(good))
    (good / "modules.json").unlink()
    assert not is_encoder_checkpoint(good)
    assert "no modules.json" in refusal(good)


# --- finish and the embed() contract ---------------------------------------------------------

def test_finish_cuts_matryoshka_dimensions_then_normalizes() -> None:
    x = torch.randn(5, 32)
    assert torch.equal(finish(x, None, False), x)
    assert torch.allclose(finish(x, None, True), x / x.norm(dim=-1, keepdim=True))
    cut = finish(x, 8, True)
    assert cut.shape == (5, 8) and torch.allclose(cut.norm(dim=-1), torch.ones(5))
    assert torch.allclose(cut, x[:, :8] / x[:, :8].norm(dim=-1, keepdim=True))
    assert torch.equal(finish(x, 8, False), x[:, :8])
    for bad in (0, 33):
        with pytest.raises(ValueError, match="dimensions must be 1..32"):
            finish(x, bad, True)


def test_embed_refuses_what_it_cannot_compute(good: Path) -> None:
    model = load_encoder(good, torch.float32, CPU).model
    assert model.embed([]).shape == (0, 16)
    assert torch.allclose(model.embed([[2, 5, 3]]).norm(), torch.tensor(1.0))
    raw = model.embed([[2, 5, 3]], normalize=False)
    assert not torch.allclose(raw.norm(), torch.tensor(1.0))
    for seqs, groups, match in [([[]], None, "lengths"), ([[5] * 67], None, "lengths"),
                                ([[5, 100]], None, "token ids"), ([[5, -1]], None, "token ids"),
                                ([[5], [6]], [[0]], "groups"), ([[5], [6]], [[0, 1, 1]], "groups"),
                                ([[5], [6]], [[0, 1], []], "groups")]:
        with pytest.raises(ValueError, match=match):
            model.embed(seqs, groups)
