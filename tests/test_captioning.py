"""The captioning task: tokens, the masked loss, decoding (greedy, sampling, beam), BLEU and CIDEr-D, decoders that
overfit a few captions, and a run that trains, resumes exactly, evaluates and predicts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import visrec
from visrec.data.text import END, NULL, START, Vocabulary, normalize_caption
from visrec.errors import VisrecError
from visrec.models import create_model
from visrec.models.caption import Captioner, masked_caption_loss
from visrec.runs import Run
from visrec.tasks.captioning import cider_d, corpus_bleu


def test_normalization_and_vocabulary():
    assert normalize_caption("  A Café, left-of THE T-shirt!! ") == "a cafe left-of the t-shirt"
    v = Vocabulary.build(["a cat", "a dog", "a cat sat"], min_count=2)
    assert v.words[:4] == ["<NULL>", "<START>", "<END>", "<UNK>"] and v.words[4:] == ["a", "cat"]
    ids, cut = v.encode("a dog cat a", max_length=3)
    assert ids == [START, 4, 3, 5, END] and cut
    assert v.decode(ids[1:]) == "a <UNK> cat"
    refs, n_cut = v.encode_references([["a cat"], ["a cat", "a a a a"]], max_length=3)
    assert refs.shape == (2, 2, 5) and n_cut == 1 and bool((refs[0, 1] == NULL).all())


def test_masked_loss_equals_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[4, 2, NULL], [3, NULL, NULL]])
    hand = 0.0
    for b in range(2):
        for t in range(3):
            if target[b, t] != NULL:
                hand -= logits[b, t].log_softmax(0)[target[b, t]].item()
    assert masked_caption_loss(logits, target).item() == pytest.approx(hand / 2, rel=1e-6)


class TableModel(Captioner):
    """A decoder whose next-word probabilities depend only on the previous word (a fixed table)."""

    def __init__(self, table: dict[int, dict[int, float]], vocab: list[str]):
        super().__init__(torch.nn.Identity(), vocab, 5, 4)
        self.table, self.v = table, len(vocab)

    def features(self, images):
        return images.new_zeros(images.shape[0], 1, 1)

    def start(self, feats):
        return {"h": feats.new_zeros(feats.shape[0], 1)}

    def step(self, state, tok, feats, t):
        logits = torch.full((len(tok), self.v), -1e9)
        for i, w in enumerate(tok.tolist()):
            for nxt, p in self.table.get(w, {END: 1.0}).items():
                logits[i, nxt] = math.log(p)
        return logits, state, None


VOCAB = ["<NULL>", "<START>", "<END>", "<UNK>", "a", "b", "c", "d"]


def test_beam_search_finds_what_greedy_misses_and_width_one_is_greedy():
    a, b, c, d = 4, 5, 6, 7
    # greedy takes "a" (0.6), then can only end with probability 0.3 or go on; "b <END>" has 0.4 in all
    m = TableModel({START: {a: 0.6, b: 0.4}, a: {END: 0.3, c: 0.36, d: 0.34}, b: {END: 1.0}, c: {END: 1.0},
                    d: {END: 1.0}}, VOCAB)
    x = torch.zeros(1, 1, 2, 2)
    greedy, _ = m.generate(x)
    assert m.decode(greedy[0]) == "a c"
    best, _ = m.generate(x, beam=3, length_penalty=0.0)
    assert m.decode(best[0]) == "b"
    one = m._beam(m.features(x), 5, 1, 0.0)[0]
    assert m.decode(one[0]) == m.decode(greedy[0])
    with pytest.raises(VisrecError, match="--beam 0 is not valid"):
        m.generate(x, beam=0)


def test_bleu_matches_sacrebleu_and_a_hand_count():
    import sacrebleu

    hyps = ["a small coat left of a bag", "a dress", "a large shirt above a coat"]
    refs = [["a small coat left of a bag", "a coat left of a bag"], ["a small dress"], ["a shirt above a coat"]]
    got = corpus_bleu(hyps, refs)
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    want = sacrebleu.corpus_bleu(hyps, streams, tokenize="none").score / 100
    assert got["bleu4"] == pytest.approx(want, abs=1e-9)
    # BLEU-1 by hand: clipped unigram matches / hypothesis words, times the brevity penalty (closest ref length)
    matches, total, hyp_len, ref_len = 7 + 2 + 5, 7 + 2 + 6, 15, 7 + 3 + 5
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    assert got["bleu1"] == pytest.approx(bp * matches / total, rel=1e-6)


def test_cider_d_rewards_consensus():
    refs = [["a small coat left of a bag", "a coat left of a bag"], ["a dress above a shirt"], ["a large shirt"]]
    perfect = cider_d([r[0] for r in refs], refs)
    wrong = cider_d(["a bag", "a bag", "a bag"], refs)
    assert perfect > 1.0 > wrong >= 0.0
    assert cider_d(["zebra"] * 3, refs) == 0.0


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru", "lstm_attention", "transformer"])
def test_each_decoder_overfits_a_few_captions(kind):
    torch.manual_seed(0)
    caps = ["a b", "b a c", "c", "a a d", "d c b a"]
    vocab = Vocabulary.build(caps)
    model = create_model(kind, in_chans=1, num_classes=len(vocab), image_size=(16, 16), vocab=vocab.words,
                         max_length=5, embed=32, hidden=64, attn=32, heads=2, layers=1, dropout=0.0)
    x = torch.randn(len(caps), 1, 16, 16)
    refs, _ = vocab.encode_references([[c] for c in caps], 5)
    t = refs[:, 0]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        masked_caption_loss(model(x, t[:, :-1]), t[:, 1:]).backward()
        opt.step()
    tokens, alphas = model.generate(x)
    assert [model.decode(s) for s in tokens] == caps
    if kind == "lstm_attention":
        assert alphas is not None and torch.allclose(alphas.sum(-1)[tokens != NULL], torch.tensor(1.0), atol=1e-5)


SCENES = {"data.scene_count": 120, "data.scene_size": 32, "data.max_objects": 2, "train.batch_size": 16,
          "train.min_epoch_steps": 0, "log.every": 4, "log.report": False,
          "model.kwargs": {"embed": 32, "hidden": 64, "attn": 32}}


def test_a_captioning_run_trains_resumes_exactly_evaluates_and_predicts(tmp_path):
    from visrec import Trainer
    from visrec.config import resolve_config

    opts = {"data.name": "scenes", "task.name": "captioning", "train.epochs": 2, **SCENES}
    full = visrec.train("scenes", task="captioning", epochs=2, out=str(tmp_path / "full"), progress=False,
                        overrides={k: v for k, v in SCENES.items()})
    cfg = resolve_config(None, [], options=opts)
    Trainer(cfg, out=str(tmp_path / "cut"), progress=False).fit(stop_after_steps=7)
    resumed = Trainer.resume(tmp_path / "cut", progress=False).fit()
    a, b = full.summary, resumed.summary
    assert a["test_loss"] == b["test_loss"] and a["test_bleu4"] == b["test_bleu4"]  # bit-exact on the CPU
    assert a["vocabulary"] > 8 and a["model"] == "lstm_attention"
    captions = json.loads((full.path / "captions_test.json").read_text())
    assert len(captions) == a["n_test"] and set(captions[0]) == {"image_id", "caption"}
    from visrec.fit import evaluate_run

    ev = evaluate_run(full.path)
    assert ev.metrics["bleu4"] == pytest.approx(a["test_bleu4"], abs=1e-12)
    from visrec.serve.model import ServedModel

    m = ServedModel(full.path, beam=2).load()
    from visrec.runs import dataset_from_config

    img = dataset_from_config(Run(full.path).config).test.images[0]
    from visrec.serve.model import Prepared

    out = m.infer([Prepared("x", img, img.shape[2], img.shape[1], "PNG")])[0]
    assert isinstance(out["caption"], str) and len(out["attention"]) == len(out["caption"].split())
    with pytest.raises(VisrecError, match="--beam 0 is not valid"):
        ServedModel(full.path, beam=0).load()
    # a color photo of another size is refused, naming the options, as a classification run refuses it
    from PIL import Image
    from typer.testing import CliRunner

    from visrec.cli import app

    Image.new("RGB", (193, 181), (120, 30, 200)).save(tmp_path / "photo.jpg")
    r = CliRunner().invoke(app, ["predict", str(full.path), str(tmp_path / "photo.jpg")])
    assert r.exit_code == 1 and "pass --convert --resize" in r.output
    r = CliRunner().invoke(app, ["predict", str(full.path), str(tmp_path / "photo.jpg"), "--convert", "--resize",
                                 "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["caption"]


def test_captioning_refuses_data_without_captions_and_other_models(tmp_path):
    with pytest.raises(VisrecError, match="task captioning needs captions, and digits has none"):
        visrec.train("digits", task="captioning", epochs=1, out=str(tmp_path / "a"), progress=False)
    with pytest.raises(VisrecError, match="is not a captioning model|is a captioning model"):
        visrec.train("scenes", task="captioning", model="convnet", epochs=1, out=str(tmp_path / "b"),
                     progress=False, overrides={k: v for k, v in SCENES.items() if k != "model.kwargs"})


def test_scene_grammar_scores():
    from visrec.tasks.captioning import parse_scene_caption, scene_scores

    assert parse_scene_caption("a small t-shirt left of a bag above a large ankle boot") == (
        [("small", "t-shirt"), ("", "bag"), ("large", "ankle boot")],
        [("t-shirt", "left of", "bag"), ("bag", "above", "ankle boot")])
    assert parse_scene_caption("two bags") is None
    refs = [["a small coat left of a bag"], ["a dress"]]
    s = scene_scores(["a large coat right of a bag", "a dress above a shirt"], refs)
    assert s["obj_recall"] == 1.0 and s["obj_precision"] == pytest.approx(3 / 4)
    assert s["relation_acc"] == 0.0 and s["size_acc"] == pytest.approx(2 / 3)
    assert scene_scores(["x"], [["not the grammar at all"]]) is None


def test_the_encoder_starts_from_a_classification_run_frozen(tmp_path):
    widths = [8, 16, 16]
    cls = visrec.train("scenes", model="convnet", epochs=1, out=str(tmp_path / "cls"), progress=False,
                       overrides={**{k: v for k, v in SCENES.items() if k != "model.kwargs"},
                                  "model.kwargs": {"widths": widths}})
    cap = visrec.train("scenes", task="captioning", epochs=1, out=str(tmp_path / "cap"), progress=False,
                       overrides={**SCENES, "model.weights": str(cls.path),
                                  "model.kwargs": {"embed": 32, "hidden": 64, "attn": 32, "freeze_encoder": True,
                                                   "encoder_kwargs": {"widths": widths}}})
    from safetensors.torch import load_file

    a = load_file(str(cls.path / "checkpoints" / "last.safetensors"))
    b = load_file(str(cap.path / "checkpoints" / "last.safetensors"))
    enc = [k for k in a if not k.startswith("head.")]
    assert enc and all(torch.equal(a[k], b[f"encoder.{k}"]) for k in enc)  # loaded, then never trained


def test_the_doctor_examines_captioning_and_its_gradients_through_time(tmp_path):
    from visrec.doctor import ExamOptions, examine

    diag = examine("scenes", model="rnn", overrides={"task.name": "captioning", **SCENES,
                                                     "model.kwargs": {"embed": 16, "hidden": 32}},
                   out=tmp_path / "doc", options=ExamOptions(overfit_steps=20, lr_steps=30))
    ids = {(f.check, f.id) for f in diag.findings}
    assert ("initial-loss", "initial-loss-off") in ids and ("overfit", "cannot-overfit") in ids
    chance = [f for f in diag.findings if f.check == "initial-loss"][0].evidence["expected"]
    assert chance and 0.5 < diag.results["initial_loss"] / chance < 2  # words x ln(vocabulary)
    g = diag.results["recurrent_gradients"]
    assert g["grad_norm_max"] >= g["grad_norm_median"] > 0 and 0 < g["first_word_share"] < 10
    assert any(f.check == "recurrent-gradients" for f in diag.findings)
