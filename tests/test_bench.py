"""The benchmark harness end to end at a tiny N: structure of results.json, positive figures."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("redact", "export", "build_dataset")
FIGURES = ("traces_per_s", "mb_per_s", "peak_rss_mb")


def test_corpus_is_seeded_streamed_and_in_every_accepted_shape(tmp_path):
    from bench.corpus import SHAPES, generate
    from stages.readers import SESSION_FORMATS, ParseError, normalize, parse_line, session_traces, sniff_file

    a = generate(tmp_path / "a", 400, seed=3)
    b = generate(tmp_path / "b", 400, seed=3)
    assert a["files"] == b["files"] and a["bytes"] == b["bytes"]
    for rel in a["files"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert {rel.split("/")[0] for rel in a["files"]} == {"approved-runs", "traces", "synthetic", "adversarial"}
    formats, bad = set(), 0
    for rel in a["files"]:
        lines = (tmp_path / "a" / rel).read_bytes().splitlines()
        fmt = sniff_file(tmp_path / "a" / rel)
        if fmt in SESSION_FORMATS:  # a session file: one trace of several event lines
            ((_, rec, took),) = session_traces(fmt, [(n, parse_line(l)) for n, l in enumerate(lines, 1)])
            assert took == len(lines) and rec["messages"][-1]["role"] == "assistant"
            formats.add(rec["format"])
            continue
        for line in lines:
            try:
                formats.add(normalize(parse_line(line))["format"])
            except ParseError:
                bad += 1
    assert formats >= {"approved_run", "openai", "openclaw_messages", "openclaw_conversation", "openclaw_pair", "sharegpt",
                       "anthropic", "claude_code", "codex"}
    assert bad == a["malformed"]
    assert sum(a["by_shape"].values()) == 400 and set(a["by_shape"]) == set(SHAPES)
    assert 0 < a["secrets"] < 60 and 500 < a["mean_bytes"] < 3000


def test_stage_commands_follow_dvc_yaml(tmp_path):
    from bench.run import stage_commands

    cmds = stage_commands(tmp_path)
    for name in STAGES:
        cmd = cmds[name]
        assert cmd[0] == sys.executable and cmd[1:3] == ["-m", f"stages.{name}"]
        paths = [w for w in cmd[3:] if not w.startswith("--")]
        assert paths and all(w.startswith(str(tmp_path)) for w in paths), cmd
    assert str(tmp_path / "raw") in cmds["redact"]


def test_smoke_run_writes_results_with_the_agreed_structure(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--n", "300", "--work", str(tmp_path / "work"), "--out", str(out), "--no-extras"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "redact" in proc.stdout and "openclaw" in proc.stdout  # the printed table
    text = out.read_text()
    res = json.loads(text)
    assert text == orjson.dumps(res, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode() + "\n"  # sorted keys
    assert res["n"] == 300
    assert set(res["stages"]) == set(STAGES)
    for name in STAGES:
        st = res["stages"][name]
        for k in (*FIGURES, "ratio_to_floor", "speedup_vs_openclaw"):
            assert isinstance(st[k], (int, float)) and st[k] > 0, (name, k, st.get(k))
    for ref in ("floor", "openclaw"):
        for k in FIGURES:
            assert res[ref][k] > 0, (ref, k)
    assert res["pipeline"]["traces_per_s"] > 0 and res["pipeline"]["speedup_vs_openclaw"] > 0
    counts = res["stages"]["redact"]["counts"]  # a session file is one trace of several lines
    assert counts["traces"] + counts["rejected"] == 300 and counts["records"] > 300
    assert res["near_dedup"].get("rows", 0) > 0 or "skipped" in res["near_dedup"]
    assert res["extras"]["noop_repro"] == {"skipped": "--no-extras"}
    # Bulky reference outputs are not left behind; the stage outputs are, for inspection.
    work = tmp_path / "work"
    assert not (work / "floor").exists() and not (work / "openclaw").exists()
    assert (work / "data" / "build_dataset" / "dataset_manifest.json").is_file()
    # The full `dvc repro` figure (an extra, skipped here): its DVC overhead is the repro minus the stages run
    # alone, and the table and targets report it against openclaw.
    from bench.run import _targets, dvc_overhead, table

    stages_wall = sum(res["stages"][s]["wall_s"] for s in STAGES)
    full = {"seconds": stages_wall + 1.5, "cpu_s": sum(res["stages"][s]["cpu_s"] for s in STAGES) + 1.0,
            "cache_type": "reflink,hardlink,copy"}
    full["dvc_overhead"] = dvc_overhead(full, res["stages"])
    full["speedup_vs_openclaw"] = res["openclaw"]["wall_s"] / full["seconds"]
    assert abs(full["dvc_overhead"]["wall_s"] - 1.5) < 1e-6 and abs(full["dvc_overhead"]["cpu_s"] - 1.0) < 1e-6
    floor = {"seconds": 2.0, "cpu_s": 1.5, "outs_mb": 300.0, "target_budget_s": 1.0, "best_possible_speedup_vs_openclaw": 0.5}
    res["extras"] = {"repro_data_stages": full, "dvc_floor": floor}
    res["targets"] = _targets(res)
    shown = table(res)
    assert "DVC overhead" in shown and "cache.type reflink,hardlink,copy" in shown and "redact / floor" in shown
    assert "DVC floor (3 stages that only copy our 300 MB of outputs): 2.00s wall" in shown
    assert "allows 1.00s in all, so at best 0.50x under dvc repro" in shown
    assert res["targets"]["dvc_repro_speedup_vs_openclaw"]["value"] == full["speedup_vs_openclaw"]


def test_refuses_to_clear_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--n", "5", "--work", str(tmp_path), "--out",
                           str(tmp_path / "r.json"), "--no-extras", "--no-openclaw"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "refusing" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_dvc_floor_repros_copies_of_the_stage_outputs(tmp_path):
    """The DVC floor really runs `dvc repro` of three copy-only stages over the given outputs: it reports their
    size, and leaves nothing behind."""
    import shutil

    from bench.run import child_env, dvc_floor

    env = child_env()
    dvc = shutil.which("dvc", path=env["PATH"])
    work, dest = tmp_path / "work", tmp_path / "dest"
    (work / "raw" / "traces").mkdir(parents=True)
    (work / "raw" / "traces" / "a.jsonl").write_text('{"messages": []}\n')
    sizes = {"redact": 1000, "export": 2000, "build_dataset": 3000}
    for name, n in sizes.items():
        (dest / "data" / name).mkdir(parents=True)
        (dest / "data" / name / "part.jsonl").write_bytes(b"x" * n)
    (work / "logs").mkdir()
    res = dvc_floor(work, dest, dvc, env)
    assert res["outs_mb"] == sum(sizes.values()) / 1e6
    assert res["seconds"] > 0 and res["cpu_s"] > 0
    assert not (work / "dvcfloor").exists()
