"""The tables as the code reads and writes them (the current schema; chatapp/storage/migrations.py builds it).

Text the customer typed goes in `SafeText` columns: Postgres text cannot hold NUL characters, so on Postgres NUL
(and the escape character itself) are escaped reversibly; SQLite stores the text unchanged, as it always did.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.types import TypeDecorator

_ESC = "\ue000"  # a private-use character: rare, and escaped itself, so decoding is exact


class SafeText(TypeDecorator):
    """TEXT that round-trips any Python str (NUL included) on both engines."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None or dialect.name == "sqlite" or (_ESC not in value and "\x00" not in value):
            return value
        return value.replace(_ESC, _ESC + _ESC).replace("\x00", _ESC + "0")

    def process_result_value(self, value, dialect):
        if value is None or dialect.name == "sqlite" or _ESC not in value:
            return value
        out, i = [], 0
        while i < len(value):
            ch = value[i]
            if ch == _ESC and i + 1 < len(value):
                out.append("\x00" if value[i + 1] == "0" else value[i + 1])
                i += 2
            else:
                out.append(ch)
                i += 1
        return "".join(out)


metadata = sa.MetaData()

turns = sa.Table(
    "turns", metadata,
    sa.Column("message_id", SafeText, primary_key=True),
    sa.Column("session_id", SafeText, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("user_message", SafeText, nullable=False),
    sa.Column("answer", SafeText, nullable=False),
    sa.Column("history", sa.Text, nullable=False, server_default="[]"),  # ASCII JSON (json.dumps)
    sa.Column("prompt_messages", sa.Text, nullable=False, server_default="[]"),
    sa.Column("retrieved", sa.Text, nullable=False, server_default="[]"),
    sa.Column("template", SafeText, nullable=False, server_default=""),
    sa.Column("template_version", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("mode", SafeText, nullable=False, server_default=""),
    sa.Column("model", SafeText, nullable=False, server_default=""),
    sa.Column("adapter", SafeText),
    sa.Column("first_token_ms", sa.Double),
    sa.Column("total_ms", sa.Double),
    sa.Column("handoff", SafeText),
    sa.Column("curated", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("user", SafeText),
    sa.Column("evidence", sa.Text, nullable=False, server_default="[]"),
    sa.Column("guard", sa.Text, nullable=False, server_default="{}"),
    sa.Column("guard_replaced", sa.Integer, nullable=False, server_default=sa.text("0")),
)

ratings = sa.Table(
    "ratings", metadata,
    sa.Column("message_id", SafeText, primary_key=True),
    sa.Column("rating", sa.Integer, nullable=False),
    sa.Column("correction", SafeText),
    sa.Column("reason", SafeText),
    sa.Column("user", SafeText),
    sa.Column("updated_at", sa.Double, nullable=False),
)

handoffs = sa.Table(
    "handoffs", metadata,
    sa.Column("handoff_id", sa.Text, primary_key=True),
    sa.Column("session_id", SafeText, nullable=False),
    sa.Column("message_id", SafeText),
    sa.Column("reason", SafeText, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

conversations = sa.Table(
    "conversations", metadata,
    sa.Column("conversation_id", SafeText, primary_key=True),
    sa.Column("state", sa.Text, nullable=False, server_default="bot"),
    sa.Column("reason", SafeText),
    sa.Column("language", sa.Text, nullable=False, server_default="en"),
    sa.Column("agent", SafeText),
    sa.Column("agent_name", SafeText),
    sa.Column("user", SafeText),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("waiting_since", sa.Double),
    sa.Column("first_human_at", sa.Double),
    sa.Column("handed_at", sa.Double),
    sa.Column("closed_at", sa.Double),
    sa.Column("note", SafeText),
    sa.Column("csat", sa.Integer),
    sa.Column("contact", SafeText),
)

conversation_messages = sa.Table(
    "conversation_messages", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("conversation_id", SafeText, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("text", SafeText, nullable=False),
    sa.Column("author", SafeText),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("meta", sa.Text, nullable=False, server_default="{}"),  # ASCII JSON
)

# Which agents have a console open (it polls): in the database so every replica sees the same agents.
agent_presence = sa.Table(
    "agent_presence", metadata,
    sa.Column("agent", SafeText, primary_key=True),
    sa.Column("seen_at", sa.Double, nullable=False),
)

# Small shared values every replica reads: the adapter registry's state, active prompt versions...
app_state = sa.Table(
    "app_state", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),  # JSON
    sa.Column("updated_at", sa.Double, nullable=False),
)

# Leases: one holder at a time (e.g. the scheduled re-tune), expiring if the holder dies.
locks = sa.Table(
    "locks", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
)

# The run-time copy of an example bank (JSONL text, as the shipped prompts/examples/*.jsonl): edited in the console,
# extended by corrections and agent replies. The revision (a hash of the text) tells a replica its copy is stale.
example_banks = sa.Table(
    "example_banks", metadata,
    sa.Column("bank", sa.Text, primary_key=True),
    sa.Column("text", SafeText, nullable=False),
    sa.Column("revision", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

# Knowledge chunk vectors (float32 bytes, n_views x dim) by embedding configuration and hash of the embedded texts.
chunk_embeddings = sa.Table(
    "chunk_embeddings", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("digest", sa.Text, primary_key=True),
    sa.Column("n_views", sa.Integer, nullable=False),
    sa.Column("vectors", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

# Saved prompt template versions (the shipped prompts/*.yaml stay files; version 1 until an edit is saved). The
# primary key is what makes saving race-free across replicas: two saves of one version number cannot both commit.
prompt_versions = sa.Table(
    "prompt_versions", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("text", SafeText, nullable=False),
    sa.Column("message", SafeText, nullable=False, server_default=""),
    sa.Column("base_version", sa.Integer),
    sa.Column("author", SafeText),
    sa.Column("created_at", sa.Double, nullable=False),
)

# The knowledge folder's files as the replicas share them (chatapp/shared_knowledge.py): each replica publishes what
# changed in its folder and writes what another replica published into its own. ``deleted`` keeps a removal (text
# empty) so it reaches every replica instead of the file coming back from one that still has it.
knowledge_documents = sa.Table(
    "knowledge_documents", metadata,
    sa.Column("path", SafeText, primary_key=True),  # relative to the knowledge folder, "/"-separated
    sa.Column("text", SafeText, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),  # of the file's bytes (the UTF-8 text)
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("updated_by", SafeText),
    sa.Column("deleted", sa.Integer, nullable=False, server_default=sa.text("0")),
)
