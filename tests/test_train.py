"""train.py end to end on CPU: real torchrun (gloo) + FSDP2 on a tiny Qwen2, a real bm25s index, the real reward.

The policy is conftest's `coin_policy`: it names the right or a wrong city about equally often, so groups
disagree, advantages are non-zero, and GRPO must learn to prefer the right city.

    python -m pytest -q tests/test_train.py
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import COMPLETIONS, QUESTION
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

import kr1
import rollout

ROOT = Path(__file__).resolve().parents[1]


def common_flags(d: Path) -> list[str]:
    return [
        "--model",
        str(d / "policy"),
        "--dataset",
        str(d / "qa.jsonl"),
        "--index",
        str(d / "index"),
        "--group-size",
        "4",
        "--prompts-per-step",
        "2",
        "--max-turns",
        "1",
        "--max-turn-tokens",
        "24",
        "--max-total-tokens",
        "48",
        "--micro-batch",
        "2",
        "--warmup-steps",
        "1",
        "--beta",
        "0.04",
    ]


def run(cmd: list[str], timeout=600, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert r.returncode == 0 or not check, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def free_port() -> int:
    with (
        socket.socket() as s
    ):  # a free port: two test runs on one machine must not share a rendezvous
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    *args: str, script: Path = ROOT / "train.py", world: int = 2, **kw
) -> subprocess.CompletedProcess:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={world}",
            f"--master_port={free_port()}",
            str(script),
            *args,
        ],
        **kw,
    )


def weights(ckpt: Path, base: Path | None = None) -> dict:
    """A checkpoint's model: hf/, or (LoRA before the run's last checkpoint, no hf/) adapter/ merged into `base`."""
    if base is not None and not (ckpt / "hf").exists():
        return rollout.load_model(str(base), adapter=ckpt / "adapter")[0].state_dict()
    return load_file(ckpt / "hf" / "model.safetensors")


def state_keys(ckpt: Path) -> list[str]:
    """The model tensors in a checkpoint's sharded state/ (torch.distributed.checkpoint metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    tensors = FileSystemReader(str(ckpt / "state")).read_metadata().state_dict_metadata
    return [k for k in tensors if k.startswith("model.")]


LORA = [
    "--lora-rank",
    "4",
    "--sft-steps",
    "1",
    "--sft-batch",
    "2",
    "--sft-lr",
    "1e-2",
    "--expert-mix",
]


@pytest.mark.parametrize("extra", [[], LORA], ids=["full", "lora-sft-mix"])
def test_two_ranks_four_steps_equal_two_plus_resume_plus_two(coin_policy, extra, tmp_path):
    """FSDP2 on 2 gloo ranks, exact resume: full fine-tuning, and LoRA + 1 SFT step + 3 GRPO steps with mixing."""
    d, run_a, run_b = coin_policy, tmp_path / "a", tmp_path / "b"
    flags = [
        *common_flags(d),
        *extra,
        "--steps",
        "3" if extra else "4",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
    ]
    torchrun(*flags, "--out", str(run_a))
    log = [json.loads(x) for x in (run_a / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [r["phase"] for r in log] == ["sft"] * bool(extra) + ["grpo"] * (4 - bool(extra))
    assert all(torch.isfinite(torch.tensor(r["loss"])) and not r["skipped"] for r in log)
    assert any(
        r.get("adv_std", 0) > 0 for r in log
    )  # the groups disagreed: there was a learning signal
    assert (run_a / "latest").read_text().strip() == "checkpoints/step_000004"
    before = load_file(d / "policy" / "model.safetensors")
    after2 = weights(run_a / "checkpoints" / "step_000002", base=d / "policy")
    assert (
        max((after2[k] - before[k]).abs().max().item() for k in before) > 1e-5
    )  # two steps changed the weights
    if extra:  # LoRA: state/ holds the adapters alone (the base is re-read from --model), hf/ is the last step's
        assert not (run_a / "checkpoints" / "step_000002" / "hf").exists()
        keys = state_keys(run_a / "checkpoints" / "step_000002")
        assert len(keys) == 2 * 7 * 2 and all(".lora_" in k for k in keys), keys

    torchrun(*flags, "--out", str(run_b), "--resume", str(run_a / "checkpoints" / "step_000002"))
    log_b = [json.loads(x) for x in (run_b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [3, 4]  # the data position and step count came back
    assert [r["reward"] for r in log_b] == [r["reward"] for r in log[2:]]
    straight = weights(run_a / "checkpoints" / "step_000004")
    resumed = weights(run_b / "checkpoints" / "step_000004")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6

    hf = Qwen2ForCausalLM.from_pretrained(
        run_b / "checkpoints" / "step_000004" / "hf"
    )  # a plain HF folder
    assert hf.config.num_hidden_layers == 2


def test_lora_adapter_loads_in_peft_with_the_same_logits(coin_policy, tmp_path):
    """The adapter train.py writes is a PEFT LoRA: peft's PeftModel, our merge-at-load and the merged hf/ folder
    give the same logits, and they differ from the base (training moved it)."""
    peft = pytest.importorskip("peft")
    d = coin_policy
    run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *common_flags(d),
            *LORA,
            "--steps",
            "1",
            "--lr",
            "1e-2",
            "--save-every",
            "0",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    settings = json.loads(
        (ckpt / "adapter" / kr1.ROLLOUT_FILE).read_text()
    )  # how kr1.py should roll out
    assert settings == {
        "k": 3,
        "max_turns": 1,
        "max_turn_tokens": 24,
        "max_total_tokens": 48,
        "mode": "agent",
    }
    keys = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    assert keys and all(
        k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in keys
    )
    ids = torch.tensor(
        [
            rollout.prompt_ids(
                AutoTokenizer.from_pretrained(d / "policy"),
                rollout.prompt_messages(QUESTION, "agent"),
            )
        ]
    )  # (1, T)
    with torch.no_grad():
        base = Qwen2ForCausalLM.from_pretrained(d / "policy").eval()
        ref = base(ids).logits
        via_peft = peft.PeftModel.from_pretrained(base, ckpt / "adapter").eval()(ids).logits
        ours = rollout.load_model(str(d / "policy"), adapter=ckpt / "adapter")[0](ids).logits
        folder = Qwen2ForCausalLM.from_pretrained(ckpt / "hf").eval()(ids).logits
    conf = peft.PeftConfig.from_pretrained(ckpt / "adapter")
    assert (conf.peft_type, conf.r, conf.base_model_name_or_path) == ("LORA", 4, str(d / "policy"))
    torch.testing.assert_close(ours, via_peft, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(folder, via_peft, atol=1e-4, rtol=1e-4)
    assert (via_peft - ref).abs().max() > 1e-3
    with pytest.raises(rollout.ModelLoadError, match="LoRA adapter"):
        rollout.load_model(str(d / "policy"), adapter=tmp_path / "no-adapter-here")


def test_adapters_name_their_base_model_by_hub_id(tmp_path):
    """An adapter of the embedded model (its GGUF is SmolLM2-135M-Instruct, quantised) names that model's hub id, so
    peft (AutoPeftModelForCausalLM) finds its base: a fresh save_adapter with base None, and the shipped adapters."""
    peft = pytest.importorskip("peft")
    state = {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
    }
    rollout.save_adapter(tmp_path / "a", state, 4, 16.0, "q_proj", base=None)
    gain = ROOT / "bench" / "results" / "grpo-gain"
    for path in (
        tmp_path / "a",
        ROOT / "data" / "smollm2-kr1-lora",
        gain / "start",
        gain / "final",
    ):
        conf = peft.PeftConfig.from_pretrained(path)
        assert (conf.peft_type, conf.base_model_name_or_path) == (
            "LORA",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ), path
    assert sorted(load_file(tmp_path / "a" / "adapter_model.safetensors")) == [
        "base_model.model." + k for k in state
    ]


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path):
    """A run killed after logging step 3 but before saving it resumes from step 2: step 3 must not appear twice."""
    import train

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.0}) + "\n" for s in (1, 2, 3)))
    train.truncate_log(log, 2)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    train.truncate_log(tmp_path / "absent.jsonl", 2)  # a first run has no log yet


KILLED = """import os, sys
import train
set_aside = train.set_aside
def killed(final):  # the real set_aside, then the process dies before the new folder is renamed in
    aside = set_aside(final)
    if final.name == sys.argv[1]:
        os._exit(9)
    return aside
train.set_aside = killed
sys.exit(train.main(sys.argv[2:]))
"""


def same_weights(x: dict, y: dict) -> bool:
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_a_save_killed_between_its_renames_loses_nothing_and_resumes_exactly(coin_policy, tmp_path):
    """A run resumed from an older checkpoint into the same --out re-saves the step OUT/latest names. Killed between
    setting the old copy aside and renaming the new one in, latest names a missing folder but both copies are
    whole: --resume OUT takes the set-aside copy and the run ends bit-identical to an uninterrupted one; with no
    copy left, --resume says so in one line and names the complete checkpoints. Also: a fresh run saves after
    step 1 whatever --save-every says and --resume continues from there exactly; --keep-last 1 keeps the newest;
    the bar shows the rollout's rows and the micro-batches."""
    d, straight, a = coin_policy, tmp_path / "straight", tmp_path / "a"
    flags = [*common_flags(d), "--steps", "6", "--lr", "1e-3", "--save-every", "4"]
    r = run([sys.executable, str(ROOT / "train.py"), *flags, "--out", str(straight)])
    done = straight / "checkpoints"
    assert sorted(p.name for p in done.iterdir()) == ["step_000001", "step_000004", "step_000006"]
    assert re.search(r"rollout \d/8 rows, \d+ tokens", r.stderr), r.stderr[-2000:]
    assert re.search(r"update \d/4 micro-batches", r.stderr), r.stderr[-2000:]
    ckpts = a / "checkpoints"
    ckpts.mkdir(parents=True)  # a run killed after saving step 4 ...
    for name in ("step_000001", "step_000004"):
        shutil.copytree(done / name, ckpts / name)
    (a / "latest").write_text("checkpoints/step_000004")
    (tmp_path / "killed.py").write_text(
        KILLED
    )  # ... resumed from step 1 into the same --out, killed re-saving 4
    resumed = ["--out", str(a), "--resume", str(ckpts / "step_000001")]
    r = run(
        [sys.executable, str(tmp_path / "killed.py"), "step_000004", *flags, *resumed], check=False
    )
    assert r.returncode == 9, r.stderr[-3000:]
    assert (
        not (ckpts / "step_000004").exists()
        and (a / "latest").read_text() == "checkpoints/step_000004"
    )
    assert same_weights(
        weights(ckpts / "step_000004.old"), weights(done / "step_000004")
    )  # the old copy: whole
    assert same_weights(
        weights(ckpts / "step_000004.tmp"), weights(done / "step_000004")
    )  # the new: 1 -> 4 exact

    import train

    assert (
        train.resolve_checkpoint(str(a)) == ckpts / "step_000004.old"
    )  # latest's step, whole, set aside
    run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *flags,
            "--out",
            str(a),
            "--resume",
            str(a),
            "--keep-last",
            "1",
        ]
    )
    assert same_weights(weights(ckpts / "step_000006"), weights(done / "step_000006"))
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "step_000004.old",
        "step_000004.tmp",
        "step_000006",
    ]
    log = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    log_straight = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 3, 4, 5, 6]  # the killed run's 2-4, then 5-6
    assert [r["reward"] for r in log] == [r["reward"] for r in log_straight[1:]]
    lost = (
        tmp_path / "lost"
    )  # latest names a step with no copy anywhere: one line naming what is left
    shutil.copytree(done / "step_000001", lost / "checkpoints" / "step_000001")
    (lost / "latest").write_text("checkpoints/step_000004")
    with pytest.raises(SystemExit) as e:
        train.resolve_checkpoint(str(lost))
    why = str(e.value.code)
    assert why.startswith("train.py: error: ") and "missing" in why and "\n" not in why, why
    assert why.endswith(
        f"complete checkpoints: step_000001; resume from the newest with --resume "
        f"{lost / 'checkpoints' / 'step_000001'}"
    ), why


def test_keep_last_keeps_the_newest_and_the_one_latest_names(tmp_path):
    """--keep-last 2 after a resumed run re-saved step 2 (latest) below an older timeline's step 10: the newest two
    by step stay, latest's too; folders being written or set aside are not its business."""
    import train

    names = [
        "step_000001",
        "step_000002",
        "step_000003",
        "step_000010",
        "step_000003.old",
        "step_000004.tmp",
    ]
    for name in names:
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer.json").write_text("{}")
    (tmp_path / "latest").write_text("checkpoints/step_000002")
    train.prune(tmp_path, 0)  # keep all
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(names)
    train.prune(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(names[1:])


def test_warmstart_only_then_control_arm_changes_no_weight(coin_policy, tmp_path):
    """--steps 0 writes the warm-start checkpoint alone; from it, --no-update (the control arm) rolls out the same
    prompts with the same seeds as the trained arm (equal first-step rewards) and leaves every weight as it was."""
    d = coin_policy
    base = [
        sys.executable,
        str(ROOT / "train.py"),
        *common_flags(d),
        *LORA[:-1],
        "--lr",
        "1e-2",
        "--save-every",
        "0",
    ]
    run([*base, "--steps", "0", "--out", str(tmp_path / "start")])
    assert (tmp_path / "start" / "latest").read_text().strip() == "checkpoints/step_000001"
    logs, w = {}, {"start": weights(tmp_path / "start" / "checkpoints" / "step_000001")}
    for arm, extra in (("trained", []), ("control", ["--no-update"])):
        run(
            [
                *base,
                "--steps",
                "2",
                "--resume",
                str(tmp_path / "start"),
                "--out",
                str(tmp_path / arm),
                *extra,
            ]
        )
        logs[arm] = [json.loads(x) for x in (tmp_path / arm / "log.jsonl").read_text().splitlines()]
        w[arm] = weights(tmp_path / arm / "checkpoints" / "step_000003")
    assert [r["step"] for r in logs["control"]] == [2, 3] and logs["control"][0]["phase"] == "grpo"
    assert (
        logs["control"][0]["reward"] == logs["trained"][0]["reward"]
    )  # same start, prompts and seeds
    assert all(torch.equal(w["control"][k], w["start"][k]) for k in w["start"])
    assert max((w["trained"][k] - w["start"][k]).abs().max().item() for k in w["start"]) > 1e-5


def test_support_reward_pays_the_gold_titles_the_searches_read():
    """score() names the passages a trajectory read by the titles its search saw, and pays --w-support times the
    share of the question's supporting_titles among them (hand-computed: 1 of 2 read, 0.5 x 0.5 = 0.25)."""
    import train

    hits = {"venice": [{"id": "7", "title": "Venice"}, {"id": "9", "title": "Murano"}]}
    search = kr1.RecordingSearch(lambda queries: [hits[q] for q in queries])
    search(["venice"])
    good = ["<think>a</think><search>venice</search>", "<think>b</think><answer>126</answer>"]
    empty = dict(ids=[], mask=[], logprobs=[], prompt_len=0, messages=[])
    traj = rollout.Trajectory(**empty, responses=good, doc_ids=[["7", "9"]], answer="126")
    row = {"question": "q", "answers": ["126"], "supporting_titles": ["venice", "Lagoon"]}
    paid = train.score(train.Config(w_support=0.5), traj, row, search)
    assert paid == {"reward": 2.25, "accuracy": 1.0, "format": 1.0, "support": 0.5}
    unnamed = train.score(train.Config(), traj, {**row, "supporting_titles": []}, search)
    assert unnamed["support"] == 0.0


def completion_margin(model_dir: Path) -> float:
    """log p(right completion) - log p(wrong completion) for the training question, teacher-forced."""
    model = Qwen2ForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = rollout.prompt_ids(tok, rollout.prompt_messages(QUESTION, "agent"))
    total = []
    for c in COMPLETIONS:
        ids = torch.tensor([prompt + tok(c, add_special_tokens=False).input_ids])  # (1, T)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)  # (T-1, V)
        total.append(logp[len(prompt) - 1 :].gather(1, ids[0, len(prompt) :, None]).sum().item())
    return total[0] - total[1]


def test_reward_rises_single_process(coin_policy):
    """Plain `python train.py` (a world of one): GRPO moves the coin flip towards the right city."""
    d = coin_policy
    run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *common_flags(d),
            "--steps",
            "24",
            "--lr",
            "1e-3",
            "--prompts-per-step",
            "1",
            "--group-size",
            "8",
            "--beta",
            "0",
            "--save-every",
            "0",
            "--out",
            str(d / "c"),
        ]
    )
    log = [json.loads(x) for x in (d / "c" / "log.jsonl").read_text().splitlines()]
    acc = [r["accuracy"] for r in log]
    assert sum(acc[-8:]) / 8 > sum(acc[:8]) / 8 + 0.1, acc
    before, after = (
        completion_margin(d / "policy"),
        completion_margin(d / "c" / "checkpoints" / "step_000024" / "hf"),
    )
    assert after > before + 1.0, (
        before,
        after,
    )  # the right answer gained at least e times the odds of the wrong


def world_of_one(monkeypatch) -> None:
    """The environment of train.main in this process as a gloo world of one."""
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(
            k, v
        )  # init_distributed's setdefault would otherwise leave them set in this process


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume", "/nonexistent/run"], "no checkpoint there"),
        (["--dataset", "no-such-org/no-such-dataset"], "could not load dataset"),
        (["--agg", "mean"], "--agg must be"),
    ],
)
def test_bad_flags_fail_clearly(coin_policy, flags, message, capsys, monkeypatch):
    """In-process through train.main(argv) (a gloo world of one): it exits with a one-line error, argparse's
    (code 2, on stderr) or SystemExit("train.py: error: ...") (code 1 when `python train.py` exits with it)."""
    import datasets
    import huggingface_hub

    import train

    world_of_one(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_OFFLINE", True
    )  # both read the env at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "argv", [str(ROOT / "train.py")])
    d = coin_policy
    with pytest.raises(SystemExit) as e:
        train.main([*common_flags(d), "--steps", "1", "--out", str(d / "bad"), *flags])
    code = e.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None) and message in err and "Traceback" not in err, err[-3000:]


def test_a_non_finite_step_is_logged_as_null_and_skipped(coin_policy, tmp_path, monkeypatch):
    """A NaN loss (injected into grpo_loss) makes a NaN gradient norm: the step is skipped, and log.jsonl stays
    strict JSON, the non-finite values written as null."""
    import grpo
    import train

    world_of_one(monkeypatch)
    loss_fn = grpo.grpo_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = loss_fn(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(grpo, "grpo_loss", nan_loss)
    assert train.main([*common_flags(coin_policy), "--steps", "1", "--out", str(tmp_path)]) == 0

    def strict(constant: str):
        raise ValueError(f"log.jsonl is not strict JSON: {constant}")

    log = [
        json.loads(x, parse_constant=strict)
        for x in (tmp_path / "log.jsonl").read_text().splitlines()
    ]
    assert [(r["loss"], r["grad_norm"], r["skipped"]) for r in log] == [(None, None, True)], log


def test_help_names_each_default_once(capsys):
    """Every flag's help ends with its default, once: booleans too; --index names the embedded corpus."""
    import dataclasses

    import train

    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    options = (
        capsys.readouterr().out.split("options:\n", 1)[1].split("\n\n", 1)[0]
    )  # the epilog follows
    helps = {b.split()[0].rstrip(","): " ".join(b.split()) for b in re.split(r"\n(?=  -)", options)}
    assert helps.pop("-h").count("(default:") == 0
    assert len(helps) == len(dataclasses.fields(train.Config))
    assert {flag: text.count("(default:") for flag, text in helps.items()} == dict.fromkeys(
        helps, 1
    )
    assert helps["--grad-ckpt"].endswith("(default: True)") and helps["--bf16"].endswith(
        "(default: False)"
    )
    assert helps["--index"].endswith("(default: the embedded Wikipedia summaries)")


def test_a_large_corpus_recipe_without_index_is_warned():
    """No --index and questions that are not the project's own: one warning line naming the corpus size."""
    import train

    warning = train.corpus_warning(train.Config(dataset="runs/2wiki/train.jsonl"), 10033)
    assert warning.startswith(
        "train.py: warning: no --index: searching the 10,033 embedded Wikipedia summaries"
    )
    assert "runs/2wiki/train.jsonl" in warning and "\n" not in warning
    assert (
        train.corpus_warning(
            train.Config(dataset="runs/2wiki/train.jsonl", index="runs/idx"), 10033
        )
        is None
    )
    assert train.corpus_warning(train.parse_args(["--preset", "offline"]), 10033) is None


def test_rollout_reports_rows_and_tokens_as_it_goes(coin_policy):
    """rollout's on_progress (train.py's bar): after every loop step, rows finished so far and tokens after the
    prompts, non-decreasing, ending at every row and the trajectories' own token count."""
    import retrieval

    lm, tok = rollout.load_model(str(coin_policy / "policy"))
    index = retrieval.open_index(coin_policy / "index")
    cfg = rollout.RolloutConfig(max_turns=1, max_turn_tokens=24, max_total_tokens=48)
    calls = []
    search = lambda qs: index.search(qs, k=2)
    generator = torch.Generator().manual_seed(0)
    trajs = rollout.rollout(
        lm,
        tok,
        [QUESTION] * 4,
        search=search,
        cfg=cfg,
        generator=generator,
        on_progress=lambda *c: calls.append(c),
    )
    rows, tokens = zip(*calls)
    assert len(calls) > 5 and list(rows) == sorted(rows) and list(tokens) == sorted(tokens)
    assert calls[-1] == (4, sum(len(t.ids) - t.prompt_len for t in trajs))


def test_update_gradient_is_the_same_for_any_micro_batch(coin_policy, monkeypatch):
    """grpo_update over 5 trajectories of unequal lengths, one an expert row: micro-batches of 1 (no padding) and of
    3 (sorted by length, right-padded, run unmasked) over the same rows in reverse order give the same loss and
    gradient, so each row keeps its own advantage and expert flag whatever order they run in."""
    import torch.distributed as dist

    import train

    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    try:
        lm, _ = rollout.load_model(
            str(coin_policy / "policy")
        )  # the attention train.py runs (kr1_sdpa)
        model, g = train.LogProbs(lm.train()), torch.Generator().manual_seed(0)
        trajs = []
        for n in (9, 14, 6, 12, 11):
            ids = torch.randint(10, 200, (1, n), generator=g)  # (1, n)
            mask = [0] * (n // 2) + [1] * (n - n // 2)
            with torch.no_grad():
                old = model(ids, torch.ones_like(ids))[0] + 0.1 * torch.randn(
                    n - 1, generator=g
                )  # (n-1,)
            trajs.append(
                rollout.Trajectory(ids[0].tolist(), mask, [0.0, *old.tolist()], n // 2, [])
            )
        trajs[2].expert = True
        adv = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3])  # (5,)
        out = []
        for micro, rows, a in ((1, trajs, adv), (3, trajs[::-1], adv.flip(0))):
            lm.zero_grad()
            cfg = train.Config(micro_batch=micro, temperature=1.0, beta=0.0, agg="token")
            loss = train.grpo_update(model, None, cfg, rows, a).loss
            out.append((loss, {n: p.grad.clone() for n, p in lm.named_parameters()}))
        # The tolerance is fp32's: the same sums in another order (micro-batches, padding, the CPU's own kernels)
        # differ by a few ulps, which the log-softmax gradient of a confident model (1 - p, p near 1) amplifies:
        # 2.5e-5 of the gradient's norm measured on AVX-512, 1.4e-4 element-wise on AVX2. The bugs this test is for
        # are far larger: a row that loses its expert flag moves the gradient by ~3e-2 (its old log-probs are 0.1
        # off), one that loses its advantage by ~0.5. So compare the whole gradient at 1e-3 of its norm.
        flat = [torch.cat([g.flatten() for g in grads.values()]) for _, grads in out]
        rel = ((flat[1] - flat[0]).norm() / flat[0].norm()).item()
        tol = 1e-3
        assert abs(out[1][0] - out[0][0]) <= tol * abs(out[0][0]), (
            f"loss {out[1][0]:.9g} vs {out[0][0]:.9g}"
        )
        assert rel < tol, (
            f"gradients differ by {rel:.2e} of their norm at micro-batch 1 vs 3 (tolerance {tol:.0e})"
        )
        assert flat[0].abs().sum() > 0
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn, *args) -> None:
    """Run fn(rank, port, ready, *args) on 2 processes (torch.multiprocessing, no torchrun); `ready` for join()."""
    ctx = torch.multiprocessing.get_context("spawn")
    torch.multiprocessing.spawn(fn, args=(free_port(), ctx.Barrier(2), *args), nprocs=2, join=True)


def join(rank: int, port: int, ready, timeout_min: float = 0.0) -> None:
    """train.init_distributed as rank `rank` of 2 gloo ranks, once both have imported (a busy machine starts them
    seconds apart, and the rendezvous must not time out)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import train

    ready.wait()
    train.init_distributed(timeout_min)


def finite_worker(rank: int, port: int, ready, cases: list, out: Path) -> None:
    import train

    join(rank, port, ready)
    got = [
        train.all_finite(
            torch.tensor(case[rank][0]), torch.tensor(case[rank][1], dtype=torch.float64)
        )
        for case in cases
    ]
    (out / f"rank{rank}.json").write_text(json.dumps(got))
    os._exit(
        0
    )  # no interpreter teardown: gloo's threads can abort it ("terminate called without an active exception")


def test_the_step_skip_decision_is_the_same_on_every_rank(tmp_path):
    """A non-finite grad norm or loss on one rank makes every rank skip the step (else the shards drift apart)."""
    nan, inf = float("nan"), float("inf")
    cases = [
        [(1.0, 0.5), (2.0, -0.5)],
        [(1.0, 0.5), (nan, 0.5)],
        [(1.0, inf), (2.0, 0.5)],
        [(nan, 0.5), (1.0, nan)],
    ]
    spawn_ranks(finite_worker, cases, tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert got == [[True, False, False, False]] * 2, got


def timeout_worker(rank: int, port: int, ready, out: Path) -> None:
    import torch.distributed as dist

    join(rank, port, ready, timeout_min=0.2)  # 12 s
    if rank == 1:  # never joins the collective; stays until rank 0 has given up, or 2 minutes
        for _ in range(1200):
            if (out / "rank0.txt").exists():
                break
            time.sleep(0.1)
    else:
        t0 = time.time()
        try:
            dist.all_reduce(torch.zeros(1))
        except Exception as e:
            (out / "rank0.txt").write_text(f"{time.time() - t0:.1f} {type(e).__name__}: {e}")
    os._exit(0)  # as finite_worker


def test_dist_timeout_reaches_the_process_group(tmp_path):
    """--dist-timeout (minutes) is the process group's collective timeout: a rank waiting for an absent peer fails
    after it, not at torch's default (30 minutes on gloo)."""
    import train

    assert train.parse_args(["--dist-timeout", "0.2"]).dist_timeout == 0.2
    spawn_ranks(timeout_worker, tmp_path)
    waited, why = (tmp_path / "rank0.txt").read_text().split(" ", 1)
    assert 10 < float(waited) < 60, (
        why
    )  # 12 s: neither the default nor rank 1 leaving after 2 minutes


def load_worker(rank: int, port: int, ready, d: Path, out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import train

    join(rank, port, ready)
    cfg = train.Config(model=str(d / "policy"), lora_rank=4, beta=0.04)
    reads, from_pretrained = [], rollout.AutoModelForCausalLM.from_pretrained
    rollout.AutoModelForCausalLM.from_pretrained = lambda *a, **k: (
        reads.append(a[0]) or from_pretrained(*a, **k)
    )
    torch.manual_seed(0)
    model, ref, tok, _ = train.build_models(cfg, torch.device("cpu"), 2)
    n_reads = len(reads)
    torch.manual_seed(
        0
    )  # the old path: every rank reads the whole model, adds LoRA (same RNG), then shards
    mesh = train.init_device_mesh("cpu", (2,))
    old = rollout.load_model(cfg.model)[0]
    rollout.add_lora(old, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    old = train.shard_model(old, mesh, False, True, len(tok))
    old_ref = train.shard_model(rollout.load_model(cfg.model)[0], mesh, False, False, len(tok))
    full = lambda m: get_model_state_dict(
        m, options=StateDictOptions(full_state_dict=True)
    )  # on every rank
    same = lambda a, b: sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([tok("Paris is a city.").input_ids])  # (1, T)
    logits, logprobs = [], []
    for new, was in ((model, old), (ref, old_ref)):
        with (
            torch.no_grad(),
            train.unsharded(new),
            train.unsharded(was),
        ):  # the rollout's path: the LM, gathered
            logits.append(torch.equal(new.lm(ids).logits, was.lm(ids).logits))
        logprobs.append(
            torch.equal(new(ids, torch.ones_like(ids)), was(ids, torch.ones_like(ids)))
        )  # the root's
    got = {
        "reads": n_reads,
        "policy": same(full(model), full(old)),
        "ref": same(full(ref), full(old_ref)),
        "lora": sum(".lora_" in k for k in full(model)),
        "buffers": all(
            torch.equal(a, b) for a, b in zip(model.buffers(), old.buffers(), strict=True)
        ),
        "logits": all(logits),
        "logprobs": all(logprobs),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(got))
    os._exit(0)  # as finite_worker


def test_sharded_load_reads_once_on_rank0_and_equals_every_rank_loading_all(coin_policy, tmp_path):
    """The policy (LoRA) and the reference are built on the meta device, sharded, and filled from rank 0's copy:
    only rank 0 reads the checkpoint (twice: policy, reference), and every parameter, buffer (rotary inv_freq: in
    no state dict) and logit equals the old path where every rank read the whole model before sharding."""
    spawn_ranks(load_worker, coin_policy, tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, g in enumerate(got):
        assert g["reads"] == (2 if rank == 0 else 0), g
        assert g["policy"] and g["ref"] and g["buffers"] and g["logits"] and g["logprobs"], g
        assert g["lora"] == 2 * 7 * 2, g
