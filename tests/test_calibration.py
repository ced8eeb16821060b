"""Contextual calibration of choice scores (`evaluation/calibration.py`, `evaluate(..., calibration=)`): the
calibrated scores against an independent computation for the base and an edited model, the removal of a label
prior put into a model on purpose, the refusals, and `run` / `compare --calibrate` end to end."""

import contextlib
import dataclasses
import json
import math

import pytest
import torch
from conftest import build
from helpers import EXAMPLES, sensitive

from eigenprune.cli import main
from eigenprune.core.batching import Example
from eigenprune.core.errors import UsageError
from eigenprune.core.positions import prompt_lengths
from eigenprune.edits.engine import score_run
from eigenprune.edits.freeze import FreezeConfig, applied
from eigenprune.edits.scoring import ScoreConfig
from eigenprune.evaluation.calibration import calibration_for, template_fields
from eigenprune.evaluation.evaluate import choice_nll, choice_scores, content_free_prior, evaluate
from eigenprune.evaluation.stats import label_distribution
from eigenprune.evaluation.tasks import CLASSIFICATION, Task, load_task

NLI = (" entails", " contradicts", " is neutral")  # 2 and 5 tokens (gpt2 style): whole strings are calibrated
DIGITS = (" 1", " 2")  # one token each (gpt2 style)
TEMPLATE = "Premise: {premise}. Hypothesis: {hypothesis}. The premise"
PREMISES = ["the cat sat on the mat", "a cat sat", "the mat", "the cause of this", "what happened as a result",
            "12 34 56", "0 1 2 3", "the correct alternative", "a result", "the cat", "9 + 9", "78 90"]


def task_of(choices, n: int = 12, template: str = TEMPLATE) -> Task:
    """A classification task rendered from `template`, every example offering `choices`."""
    examples = [Example(template.format(premise=p, hypothesis=PREMISES[(i + 3) % len(PREMISES)]),
                        choices[i % len(choices)], choices, i % len(choices)) for i, p in enumerate(PREMISES[:n])]
    return Task("toy", CLASSIFICATION, examples, examples, choices=choices, template=template)


def direct_logprob(model, tok, prompt: str, choice: str) -> float:
    """log p(choice | prompt): the summed log-softmax of its tokens, one unbatched forward of prompt + choice."""
    prompt_ids = tok(prompt)["input_ids"]
    answer = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer[:-1]])  # (1, pos)
    with torch.inference_mode(), prompt_lengths(model, torch.tensor([len(prompt_ids)])):
        logp = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (pos, vocab)
    return sum(float(logp[len(prompt_ids) - 1 + k, t]) for k, t in enumerate(answer))


def direct_calibrated(model, tok, task: Task) -> tuple[list[list[float]], list[float]]:
    """Each test example's calibrated scores log p(c | x) - log p_cf(c), and p_cf: the content-free prompts
    written out by hand, their probabilities averaged, then normalised over the choices."""
    fields = {"premise": None, "hypothesis": None}
    prompts = [TEMPLATE.format(**dict.fromkeys(fields, filler)) for filler in ("N/A", "", "[MASK]")]
    probs = [[math.exp(direct_logprob(model, tok, p, c)) for c in task.choices] for p in prompts]
    mean = [sum(col) / len(prompts) for col in zip(*probs, strict=True)]
    prior = [m / sum(mean) for m in mean]
    scores = [[direct_logprob(model, tok, ex.prompt, c) - math.log(q) for c, q in zip(task.choices, prior,
                                                                                       strict=True)]
              for ex in task.test]
    return scores, prior


@pytest.mark.parametrize("arch", ["gpt2", "llama", "phi"])
def test_calibrated_scores_equal_a_direct_computation_for_the_base_and_an_edit(arch):
    model, tok = sensitive(arch)
    task = task_of(NLI, n=6)
    calibration = calibration_for(task, "choice")
    run = score_run(model, tok, EXAMPLES, targets="all", config=ScoreConfig(partners="all"), progress=False)
    priors = []
    for edited in (False, True):
        with applied(model, run.edit(FreezeConfig(p=0.3))) if edited else torch.inference_mode():
            nll, log_prior = choice_scores(model, tok, task.test, batch_size=4, calibration=calibration)
            want, prior = direct_calibrated(model, tok, task)
            result = evaluate(model, tok, task.test, "choice", batch_size=4, calibration=calibration)
        torch.testing.assert_close(log_prior.exp(), torch.tensor(prior, dtype=torch.double), rtol=1e-4, atol=1e-6)
        for got, w in zip(nll, want, strict=True):
            torch.testing.assert_close(-got, torch.tensor(w, dtype=torch.double), rtol=1e-4, atol=1e-4)
        assert result.content_free == pytest.approx(dict(zip([c.strip() for c in NLI], prior, strict=True)),
                                                    rel=1e-4)
        assert content_free_prior(result.correct) == result.content_free
        picked = [max(range(len(NLI)), key=lambda c, row=row: row[c]) for row in want]
        assert list(result.predicted) == [NLI[i].strip() for i in picked]
        priors.append(torch.tensor(prior).log())
    assert float((priors[0] - priors[1]).abs().max()) > 1e-3  # the edit has its own content-free distribution


@contextlib.contextmanager
def biased(model, token: int, bias: float):
    """A forward hook on the LM head that adds `bias` to one token's logit at every position: a label prior."""
    def hook(module, args, out):
        out = out.clone()
        out[..., token] += bias
        return out

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_calibration_removes_a_label_prior_put_into_the_model():
    model, tok = build("gpt2")
    examples = [Example(TEMPLATE.format(premise=a, hypothesis=b), " 1", DIGITS, 0) for a in PREMISES for b in PREMISES]
    task = Task("toy", CLASSIFICATION, examples, examples, choices=DIGITS, template=TEMPLATE)
    calibration = calibration_for(task, "choice")
    one = tok(" 1", add_special_tokens=False)["input_ids"][0]
    gaps = torch.stack([v[1] - v[0] for v in choice_nll(model, tok, examples)])  # (n,) log p(1|x) - log p(2|x)
    centre = -float(gaps.median())  # the model with this offset answers "1" for about half the examples
    with biased(model, one, centre):
        gold = evaluate(model, tok, examples, "choice").predicted
        centred = evaluate(model, tok, examples, "choice", calibration=calibration).predicted
    examples = [dataclasses.replace(ex, label=int(g) - 1, answer=DIGITS[int(g) - 1]) for ex, g in zip(examples, gold,
                                                                                                     strict=True)]
    assert 0.3 < label_distribution(gold)["counts"]["1"] / len(gold) < 0.7
    with biased(model, one, centre + 6.0):  # a strong prior for "1"
        plain = evaluate(model, tok, examples, "choice")
        calibrated = evaluate(model, tok, examples, "choice", calibration=calibration)
    assert label_distribution(plain.predicted)["one_label"] and label_distribution(plain.predicted)["top"] == "1"
    # a constant logit offset on a one-token label word cancels exactly: the calibrated answers do not depend
    # on it (the unbiased model's, the centred one's and the strongly biased one's are the same)
    unbiased = evaluate(model, tok, examples, "choice", calibration=calibration).predicted
    assert calibrated.predicted == centred == unbiased
    share = lambda labels: label_distribution(labels)["counts"].get("1", 0) / len(labels)
    assert abs(share(calibrated.predicted) - share(gold)) < abs(share(plain.predicted) - share(gold)) - 0.2
    assert calibrated.accuracy > plain.accuracy + 0.1
    assert calibrated.content_free["1"] > 0.99  # the prior it removed


def test_calibration_off_changes_nothing():
    model, tok = sensitive()
    task = task_of(NLI, n=6)
    plain = evaluate(model, tok, task.test, "choice")
    again = evaluate(model, tok, task.test, "choice", calibration=None)
    assert torch.equal(plain.correct, again.correct) and plain.predicted == again.predicted
    assert plain.content_free is None and content_free_prior(plain.correct) is None
    nll, prior = choice_scores(model, tok, task.test)
    assert prior is None


def test_content_free_prompts_of_the_builtin_tasks():
    cb = calibration_for(load_task("cb"), "choice")
    assert len(cb.prompts) == 3 and cb.prompts[0].startswith("Premise: N/A\n\nHypothesis: N/A\n\n")
    assert "[MASK]" in cb.prompts[2] and cb.choices == NLI
    copa = calibration_for(load_task("copa"), "choice")  # shared label words " 1"/" 2": the position prior
    assert "Alternative 1: N/A\nAlternative 2: N/A" in copa.prompts[0] and copa.choices == DIGITS
    assert template_fields("{a} x {b.c} {a} {d[0]} {{e}}") == ["a", "b", "d"]
    bare = calibration_for(Task("t", CLASSIFICATION, task_of(DIGITS).train, task_of(DIGITS).test, choices=DIGITS,
                                template="{text}"), "choice")
    assert bare.prompts == ("N/A", "[MASK]")  # "" alone is no prompt


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refusals_are_one_line(tmp_path):
    per_example = tmp_path / "copa_like.jsonl"
    per_example.write_text("".join(json.dumps({"p": f"{a} +", "choices": [f" {a}", f" {a + 1}"], "label": 1}) + "\n"
                                   for a in range(10)))
    task = load_task(str(per_example), template="{p}")
    with pytest.raises(UsageError) as err:
        calibration_for(task, "choice")
    assert "differ per example" in one_line(err)
    ready = tmp_path / "ready.jsonl"
    ready.write_text("".join(json.dumps({"prompt": f"{a} +", "choices": [" 1", " 2"], "label": a % 2}) + "\n"
                             for a in range(10)))
    with pytest.raises(UsageError) as err:
        calibration_for(load_task(str(ready)), "choice")
    assert "'ready'" in one_line(err) and "template" in one_line(err)
    with pytest.raises(UsageError) as err:
        calibration_for(load_task("cb"), "exact")
    assert "'exact'" in one_line(err)
    model, tok = build("gpt2")
    with pytest.raises(UsageError):
        evaluate(model, tok, task_of(DIGITS).test, "next-token", calibration=calibration_for(task_of(DIGITS),
                                                                                              "choice"))


def test_cli_refuses_in_one_line(sums_setup, tmp_path, capsys):
    model, task = map(str, sums_setup)
    assert main(["run", "--model", model, "--task", task, "--calibrate", "--quiet", "--out", str(tmp_path / "r")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "differ per example" in err and not (tmp_path / "r").exists()


def write_shared_task(path):
    rows = [{"a": a, "b": b, "choices": [" 1", " 2"], "label": (a + b) % 2} for a in range(8) for b in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_run_and_compare_record_the_calibration(sums_setup, tmp_path):
    model = str(sums_setup[0])
    task = str(write_shared_task(tmp_path / "parity.jsonl"))
    common = ["--model", model, "--task", task, "--template", "Sum: {a} + {b} =", "--limit", "12", "--targets", "all",
              "--partners", "2", "--n-boot", "50", "--no-side-effects", "--quiet", "--p", "0.5", "--calibrate"]
    assert main(["run", *common, "--out", str(tmp_path / "r")]) == 0
    run = json.loads((tmp_path / "r" / "report.json").read_text())
    block = run["calibration"]
    assert block["content_free_prompts"] == ["Sum: N/A + N/A =", "Sum:  +  =", "Sum: [MASK] + [MASK] ="]
    assert sum(block["base_content_free"].values()) == pytest.approx(1.0)
    assert set(block["content_free"]["pruned"][0]) == {"1", "2"}
    assert "contextual calibration" in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["calibrate"] is True
    assert main(["compare", *common, "--methods", "eigenprune,smallest", "--out", str(tmp_path / "c")]) == 0
    report = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert report["calibration"]["base_content_free"] == block["base_content_free"]
    content_free = report["calibration"]["content_free"]
    assert set(content_free) == set(report["methods"])
    assert all(set(prior) == {"1", "2"} for per_fold in content_free.values() for prior in per_fold)
    assert "contextual calibration" in report["verdict"]
    assert main(["run", *common, "--folds", "2", "--out", str(tmp_path / "f")]) == 0
    folds = json.loads((tmp_path / "f" / "report.json").read_text())["calibration"]
    assert folds["base_content_free"] == block["base_content_free"]  # the same model and prompts in every fold
    assert len(folds["content_free"]["pruned"]) == 2 and all(folds["content_free"]["pruned"])
    plain = [a for a in common if a != "--calibrate"]
    assert main(["run", *plain, "--out", str(tmp_path / "p")]) == 0
    assert "calibration" not in json.loads((tmp_path / "p" / "report.json").read_text())


def test_demonstrations_go_before_the_content_free_prompts_too():
    """svd-clip's in-context harness: the content-free input sits where the example does, after the demos."""
    from eigenprune.evaluation.splits import Splits
    from eigenprune.methods.svd_clip import icl_harness, with_demonstrations
    from eigenprune.protocol.harness import Harness

    task = task_of(DIGITS)
    calibration = calibration_for(task, "choice")
    seen = []

    class Recording(Harness):
        def evaluate(self, split):
            seen.append(self.calibration)
            return super().evaluate(split)

    model, tok = build("gpt2")
    parent = Recording(model, tok, Splits(task.train, task.test, task.test), "choice",
                       type("Cfg", (), {"eval_batch_size": 4})(), quiet=True, calibration=calibration)
    demos = task.train[:2]
    icl = icl_harness(parent, demos)
    icl.evaluate("dev")
    want = tuple(ex.prompt for ex in with_demonstrations(calibration.examples(), demos))
    assert seen[0].prompts == want and want[0].endswith(calibration.prompts[0]) and want[0] != calibration.prompts[0]
    assert parent.calibration is calibration  # restored


def test_the_harness_calibrates_the_base_and_every_edit_each_with_its_own_prior():
    from eigenprune.evaluation.splits import Splits
    from eigenprune.protocol.harness import Harness

    model, tok = sensitive("llama")
    task = task_of(NLI, n=6)
    settings = type("Cfg", (), {"eval_batch_size": 4})()
    harness = Harness(model, tok, Splits(task.train, task.test, task.test), "choice", settings, quiet=True,
                      calibration=calibration_for(task, "choice"))
    run = score_run(model, tok, EXAMPLES, targets="all", config=ScoreConfig(partners="all"), progress=False)
    with harness.step("base"):
        base = content_free_prior(harness.evaluate("test"))
    with harness.step("a method"), applied(model, run.edit(FreezeConfig(p=0.3))):
        edited = content_free_prior(harness.evaluate("dev"))
    assert base is not None and edited is not None and base != edited
