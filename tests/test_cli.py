"""The `smolcandle` command line, driven as a user drives it: a real pseudo-terminal (pexpect)
for `chat`, subprocesses for the rest; the real SmolLM2-135M model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect

from models import ROOT

CLI = [sys.executable, "-m", "smolcandle"]


def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, input=input, timeout=300)


def test_version_and_help_on_every_command():
    v = run("--version")
    assert v.returncode == 0 and v.stdout.startswith("smolcandle ")
    for cmd in ([], ["chat"], ["run"], ["serve"], ["info"], ["models"]):
        r = run(*cmd, "--help")
        assert r.returncode == 0 and "usage: smolcandle" in r.stdout, cmd
    assert "--temperature" in run("run", "--help").stdout and "--device" in run("chat", "--help").stdout


def test_run_json(smollm2, smollm2_file):
    """The command line's greedy answer is the library's, to the token."""
    system, question = "You are a helpful assistant.", "What is the capital of France?"
    r = run("run", str(smollm2_file), question, "--system", system, "--json", "--temperature", "0", "--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["content"]
    same = smollm2.chat([{"role": "system", "content": system}, {"role": "user", "content": question}], stream=False, temperature=0, max_tokens=24)
    assert out["content"] == same.content and out["finish_reason"] == same.finish_reason
    assert out["usage"]["completion_tokens"] == same.usage.completion_tokens
    assert out["model"] == smollm2_file.name and out["tool_calls"] == []


def test_run_reads_stdin_and_streams_text(smollm2, smollm2_file):
    r = run("run", str(smollm2_file), "--temperature", "0", "--max-tokens", "8", input="Say hello.")
    same = smollm2.chat([{"role": "user", "content": "Say hello."}], stream=False, temperature=0, max_tokens=8)
    assert r.returncode == 0 and r.stdout.strip() == same.content.strip()


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    for args in (["run", str(bad), "hi"], ["info", str(bad)], ["run", "no-such-model", "hi"], ["serve", "no-such-model"]):
        r = run(*args)
        assert r.returncode == 1 and r.stderr.startswith("smolcandle: ") and "Traceback" not in r.stderr, args


def test_rope_scaling_flag(fixture_path):
    """YaRN from the command line, as transformers' config writes it; a bad one is a message."""
    path = str(fixture_path("gqa-f32"))
    yarn = '{"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}'
    r = run("run", path, "hi", "--rope-scaling", yarn, "--max-tokens", "4", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["usage"]["completion_tokens"] >= 1
    r = run("run", path, "hi", "--rope-scaling", "{yarn")
    assert r.returncode == 2 and "--rope-scaling: not JSON" in r.stderr, r.stderr
    r = run("run", path, "hi", "--rope-scaling", '{"rope_type": "linear", "factor": 2}')
    assert r.returncode == 1 and "smolcandle: invalid parameter rope_scaling" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_info(smollm2_file):
    r = run("info", str(smollm2_file))
    assert r.returncode == 0
    assert "llama" in r.stdout and "Q4_1 x210" in r.stdout and "49152 tokens" in r.stdout and "chat template" in r.stdout
    j = json.loads(run("info", str(smollm2_file), "--json").stdout)
    assert j["hyperparameters"]["block_count"] == 30 and j["vocabulary"]["pre"] == "smollm"
    # The store's recommended settings for the demo model.
    assert j["recommended"] == {"system_prompt": "You are a helpful assistant.", "temperature": 0.0}
    assert "recommended   system_prompt 'You are a helpful assistant.', temperature 0.0" in r.stdout


def test_a_known_model_is_recognised_by_its_content_not_its_name(smollm2_file, tmp_path):
    renamed = tmp_path / "my-model.gguf"
    renamed.symlink_to(smollm2_file)
    j = json.loads(run("info", str(renamed), "--json").stdout)
    assert j["recommended"] == {"system_prompt": "You are a helpful assistant.", "temperature": 0.0}


THINKING = str(ROOT / "tests" / "data" / "thinking_chatml.jinja")


def test_run_shows_reasoning_dimmed_hidden_or_in_json(smollm2_file):
    """With a template that opens the reasoning block and a budget, `run` writes the reasoning
    to stderr (dimmed on a terminal), the answer to stdout; --hide-reasoning drops it; --json
    has both, as the library gives them."""
    common = ("--chat-template", THINKING, "--max-reasoning-tokens", "8", "--temperature", "0", "--max-tokens", "40")
    shown = run("run", str(smollm2_file), "Describe the water cycle.", *common)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() and shown.stderr.strip()
    hidden = run("run", str(smollm2_file), "Describe the water cycle.", *common, "--hide-reasoning")
    assert hidden.stdout == shown.stdout and shown.stderr.strip() not in hidden.stderr
    j = json.loads(run("run", str(smollm2_file), "Describe the water cycle.", *common, "--json").stdout)
    assert j["reasoning"] and j["content"] and j["usage"]["reasoning_tokens"] >= 8
    assert j["reasoning"] in shown.stderr and j["content"] == shown.stdout.strip()


def test_chat_shows_reasoning_dimmed(smollm2_file):
    env = {**{k: v for k, v in os.environ.items() if k != "NO_COLOR"}, "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "smolcandle", "chat", str(smollm2_file), "--temperature", "0", "--max-tokens", "40",
                                           "--chat-template", THINKING, "--max-reasoning-tokens", "6"], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect(">>> ")
        child.sendline("Describe the water cycle.")
        child.expect("thinking: ")
        child.expect(r"\x1b\[2m")  # the reasoning is dimmed
        child.expect(">>> ")
        child.close()
    finally:
        child.close(force=True)


def test_chat_in_a_terminal(smollm2_file):
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    # Room for an answer far longer than the time Ctrl-C takes to arrive on a loaded machine:
    # drafts decode SmolLM2 at a few hundred tokens a second.
    child = pexpect.spawn(sys.executable, ["-m", "smolcandle", "chat", str(smollm2_file), "--temperature", "0", "--max-tokens", "3000",
                                           "--system", "You are a helpful assistant."], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect(">>> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"tokens/s")
        child.expect(r"context: \d+ of \d+ tokens")
        child.expect(">>> ")
        child.sendline("/no_think")
        child.expect("no thinking switch")  # SmolLM2's template has none
        child.expect(">>> ")
        # A long answer, stopped with Ctrl-C: the program stays.
        child.sendline("Write a very long story about a lighthouse keeper and the sea, with many chapters.")
        child.expect("chapters.\r\n")  # the echo of the line
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect(r"\[stopped\]")
        child.expect(">>> ")
        # Multi-line input, then leave.
        child.sendline('"""')
        child.sendline("Say the word ok.")
        child.sendline('"""')
        child.expect(">>> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_serve_says_when_its_redis_or_database_is_out_of_reach(tmp_path):
    from server import free_port

    port = str(free_port())
    closed = free_port()  # nothing listens there
    for option, url, says in (
        ("--redis", f"redis://127.0.0.1:{closed}/0", "cannot reach Redis"),
        ("--database", f"postgresql://nobody:secret@127.0.0.1:{closed}/x", "cannot reach PostgreSQL"),
    ):
        r = run("serve", "--port", port, option, url)
        assert r.returncode == 1 and f"smolcandle serve: {says}" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "secret" not in r.stderr  # no password in the message
