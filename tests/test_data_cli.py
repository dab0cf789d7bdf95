"""`python -m gptj.data` and the rule that the data layer never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptj.data.__main__ import main
from tests.fixtures.data import mnli_file, tiny_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cli_json(tmp_path, capsys):
    path = mnli_file(tmp_path)
    path.write_text(path.read_text() + '{"premise": "x", "hypothesis": "y", "label": "-"}\n')
    assert main(["--dataset", str(path), "--tokenizer", str(tiny_tokenizer_dir()), "--show", "2",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ex = out["examples"][0]
    assert ex["text"] == ("mnli hypothesis: A cat sleeps in the kitchen. premise: The red cat sleeps "
                          "in the kitchen. target: entailment<|endoftext|>")
    assert ex["prompt"] + ex["target"] + "<|endoftext|>" == ex["text"]
    assert ex["target"] == " entailment" and ex["num_tokens"] > 10
    assert len(out["examples"]) == 2
    s = out["summary"]
    assert (s["read"], s["kept"], s["skipped"], s["truncated"]) == (6, 5, {"unlabeled": 1}, 0)


def test_cli_text_defaults(capsys):
    assert main(["--show", "1"]) == 0
    out = capsys.readouterr().out
    assert "bundled:mnli_sample [train]" in out and "prompt: 'mnli hypothesis:" in out
    assert "summary: read 4000, kept 4000" in out


def test_cli_error_is_short(capsys, tmp_path):
    assert main(["--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_cli_subprocess_json():
    result = subprocess.run([sys.executable, "-m", "gptj.data", "--json", "--show", "1",
                             "--split", "validation_mismatched"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["summary"]["kept"] == 400 and out["examples"][0]["prompt"].endswith("target:")


def test_data_never_imports_torch(tmp_path):
    code = f"""
import sys
import gptj.data as data
tok = data.load_tokenizer({str(tiny_tokenizer_dir())!r})
tok.save({str(tmp_path / 'saved')!r})
tr = data.build_train_data('mnli', None, 'bundled:tiny', 64, cache_dir={str(tmp_path)!r})
tr.batch([0, 1])
ev = data.build_eval_data('mnli', None, tok, 'validation_matched', use_cache=False)
next(ev.shard(2, 1).batches(4))
s = data.TrainSampler(tr.num_rows, 8, 4)
data.BatchLoader(tr, s).next_step()
from gptj.data.__main__ import main
main(['--show', '1', '--json'])
import huggingface_hub
huggingface_hub.snapshot_download = lambda repo_id, **kw: {str(tiny_tokenizer_dir())!r}
data.load_tokenizer('someone/hub-tokenizer').encode(['a'])
bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2").is_dir(),
                    reason="GPT-2 tokenizer files not present at ../shared/data/gpt2")
def test_gpt2_directory_does_not_import_torch():
    gpt2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2"
    code = (f"import sys; import gptj.data as data; t = data.load_tokenizer({str(gpt2)!r}); t.encode(['a b']); "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
