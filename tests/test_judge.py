"""The LLM judge: lenient parsing of its reply, the wire call to an OpenAI-compatible endpoint, and
later rounds for calls that failed past their own retries."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from doctune.judge import judge_replies, parse_judge_reply
from doctune.settings import LLMSettings
from tests.endpoints import JSONHandler


def test_parse_judge_reply_is_lenient():
    assert parse_judge_reply('```json\n{"score": 4, "reason": "has the price"}\n```').score == 4
    assert parse_judge_reply('Sure! {"score": "5", "reason": "all facts"} Hope this helps').score == 5
    assert parse_judge_reply("Score: 2/5, the number is wrong").score == 2
    assert parse_judge_reply("评分：3分").score == 3
    assert parse_judge_reply("4").score == 4
    bad = parse_judge_reply('{"score": 9}')
    assert bad.score is None and "unreadable" in bad.reason


def test_judge_calls_an_openai_compatible_endpoint():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps({
                "id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": '{"score": 4, "reason": "price right"}'}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = LLMSettings(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge", max_retries=0)
        scores = judge_replies(llm, [("How much is the X2?", "149 euros.", "It costs 149 euros.", "en"),
                                        ("退货期限是多久？", "30天。", "30天", "zh")])
    finally:
        server.shutdown()
    assert [s.score for s in scores] == [4, 4]
    prompts = sorted(r["messages"][0]["content"] for r in seen)
    assert "How much is the X2?" in prompts[0] and "It costs 149 euros." in prompts[0]
    assert "退货期限是多久？" in prompts[1] and "参考答案" in prompts[1]
    assert all(r["temperature"] == 0 for r in seen)


@pytest.mark.parametrize("task_retries, scored", [(1, [4, 4]), (0, [None, None])])
def test_judge_calls_failing_past_their_own_retries_get_a_later_round(task_retries, scored):
    """The judge endpoint answers 500 to its first 4 requests: each call's own retry (max_retries=1)
    is spent, and only a later round (task_retries) scores the replies."""
    seen = []

    class Handler(JSONHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(1)
            if len(seen) <= 4:
                return self._send(500, {"error": {"message": "overloaded"}})
            self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                             "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                 "role": "assistant", "content": '{"score": 4, "reason": "ok"}'}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        llm = LLMSettings(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge", max_retries=1,
                          task_retries=task_retries, retry_delays_s=[0.1])
        scores = judge_replies(llm, [("Q1?", "A.", "A.", "en"), ("Q2?", "B.", "B.", "en")])
    finally:
        server.shutdown()
    assert [s.score for s in scores] == scored
    assert len(seen) == 4 + (2 if task_retries else 0)
    if not task_retries:
        assert all("judge call failed" in s.reason and "HTTP 500" in s.reason for s in scores)
