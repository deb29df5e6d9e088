"""The inbox on the storage layer, on both engines: its rules survive a restart, text is kept exactly, and two
replicas' worth of connections racing to claim get one winner per conversation (tests/test_handoff.py has the
rest of the handoff, on the default SQLite file)."""
from __future__ import annotations

import threading

import pytest

from chatapp.inbox import Inbox, InboxError


def test_inbox_rules_and_restart_on_both_engines(db_target):
    db = db_target  # an SQLite file or a Postgres database: the same behaviour
    inbox = Inbox(db)
    inbox.ensure("c1")
    inbox.add("c1", "customer", "<b>help</b>")
    inbox.request_person("c1", "user_request")
    inbox.ensure("c2")
    inbox.request_person("c2", "downvoted")
    assert [c.conversation_id for c in inbox.open_conversations()] == ["c1", "c2"]
    assert inbox.queue_position("c2") == 2
    inbox.claim("c1", "ann", "Ann")
    with pytest.raises(InboxError, match="Ann already has this conversation"):
        inbox.claim("c1", "bob", "Bob")
    with pytest.raises(InboxError, match="Ann has this conversation"):
        inbox.reply("c1", "bob", "Bob", "hi")
    inbox.reply("c1", "ann", "Ann", "Hello, I'm Ann")
    inbox.hand_back("c1", "ann", "answered")
    with pytest.raises(InboxError, match="already handed back"):
        inbox.reply("c1", "ann", "Ann", "one more thing")
    inbox.resolve("c2", "bob", "duplicate")
    with pytest.raises(InboxError, match="already resolved"):
        inbox.reply("c2", "bob", "Bob", "late")
    inbox.close()
    again = Inbox(db)  # a restart keeps states and messages
    assert again.get("c1").state == "bot" and again.get("c2").state == "resolved"
    assert [m.role for m in again.messages("c1")] == ["customer", "system", "agent", "system"]
    figures = again.figures()["period"]
    assert figures["handoff_rate"] == 1.0 and figures["first_reply_p50_s"] is not None
    again.add("c1", "bot", "Here is the answer \x00 <b>", meta={"message_id": "m_1"})
    again.add("c1", "bot", "another", meta={"message_id": "m11"})
    again.set_rating("m_1", -1)  # "_" is not a LIKE wildcard here: m11 keeps no rating
    metas = {m.text: m.meta for m in again.messages("c1") if m.role == "bot"}
    assert metas == {"Here is the answer \x00 <b>": {"message_id": "m_1", "rating": -1}, "another": {"message_id": "m11"}}
    again.close()


def test_two_replicas_claiming_at_once_get_one_winner(db_target):
    """Two Inbox objects (two replicas' worth of connections) and 8 agents race for each conversation."""
    replicas = [Inbox(db_target), Inbox(db_target)]
    try:
        for n in range(5):
            replicas[0].ensure(f"c{n}")
            replicas[0].request_person(f"c{n}", "user_request")
        wins: list[tuple[str, str]] = []
        start = threading.Barrier(8)

        def agent(i: int) -> None:
            inbox = replicas[i % 2]
            start.wait()
            for n in range(5):
                try:
                    inbox.reply(f"c{n}", f"agent{i}", f"Agent {i}", "mine")
                    wins.append((f"c{n}", f"agent{i}"))
                except InboxError:
                    pass

        threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(c for c, _ in wins) == [f"c{n}" for n in range(5)], wins  # each won by exactly one agent
        for conversation, winner in wins:
            got = replicas[1].get(conversation)
            assert got.state == "with_agent" and got.agent == winner
            assert [m.role for m in replicas[1].messages(conversation)] == ["system", "agent"]
        replicas[0].seen("ann")
        assert replicas[1].agents_online() == ["ann"]  # presence is shared too
    finally:
        for inbox in replicas:
            inbox.close()
