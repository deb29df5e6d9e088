"""Reading the knowledge folder: chunking, FAQ files, and every kind of bad input (no model needed here)."""
from __future__ import annotations

import os

import pytest

from chatapp.config import REPO_ROOT
from chatapp.knowledge import (Problems, chunk_markdown, parse_faq_csv, parse_faq_jsonl, parse_file, read_text,
                               scan_folder)

MB = 2**20


def test_markdown_splits_on_headings_and_keeps_source_heading_and_position():
    text = ("# Returns\n\nIntro paragraph.\n\n## By mail\n\nPrint the label.\n\n```\n# not a heading\n```\n\n"
            "### Label lost\n\nWe send a new one.\n\n## In store\n\nBring the receipt.\n")
    chunks = chunk_markdown("help/returns.md", text, 1200)
    assert [c.title for c in chunks] == ["Returns", "Returns › By mail", "Returns › By mail › Label lost",
                                         "Returns › In store"]
    assert [c.position for c in chunks] == [0, 1, 2, 3]
    assert all(c.source == "help/returns.md" and c.kind == "doc" for c in chunks)
    assert "# not a heading" in chunks[1].text  # a code fence is not split
    assert chunks[2].chunk_id == "help/returns.md#2"


def test_long_sections_are_cut_below_chunk_chars_and_front_matter_sets_entity():
    body = "\n\n".join(f"Paragraph {i} " + "word " * 60 for i in range(10))
    text = f"---\nentity: Acme Boots\ncategory: product\n---\n# Boots\n\n{body}\n"
    chunks = chunk_markdown("boots.md", text, 500)
    assert len(chunks) > 3
    assert all(len(c.text) <= 500 for c in chunks)
    assert all(c.entity == "Acme Boots" and c.category == "product" for c in chunks)
    assert "".join(c.text for c in chunks).count("Paragraph") == 10  # nothing lost


def test_faq_jsonl_skips_malformed_lines_with_file_and_line(caplog):
    text = "\n".join([
        '{"id": "q1", "question": "Do you have wifi?", "answer": "Yes.", "entity_name": "ALLENBELL", "domain": "hotel"}',
        '{"question": "broken json", ',
        '["not", "an", "object"]',
        '{"question": "No answer here"}',
        '',
        '{"question": "Parking?", "answer": "Free.", "entity": "Avalon", "category": "hotel"}',
    ])
    problems = Problems()
    chunks = parse_faq_jsonl("faq/hotels.jsonl", text, problems)
    assert [c.text for c in chunks] == ["Do you have wifi?", "Parking?"]
    assert chunks[0].chunk_id == "faq/hotels.jsonl#q1" and chunks[1].chunk_id == "faq/hotels.jsonl#L6"
    assert chunks[0].entity == "ALLENBELL" and chunks[0].category == "hotel" and chunks[0].answer == "Yes."
    assert [m.split(":")[1] for m in problems.messages] == ["2", "3", "4"]
    assert all(m.startswith("faq/hotels.jsonl:") for m in problems.messages)
    assert "faq/hotels.jsonl:2" in caplog.text  # also logged


def test_faq_csv_with_quoted_multiline_fields_and_bad_rows():
    text = ('Question,Answer,Entity\n'
            '"How do I return?","Print the label,\nthen mail it.",\n'
            'only one field\n'
            'Is it free?,,Acme\n'
            'Do you ship abroad?,Yes to 40 countries.,Acme\n')
    problems = Problems()
    chunks = parse_faq_csv("faq.csv", text, problems)
    assert [c.text for c in chunks] == ["How do I return?", "Do you ship abroad?"]
    assert chunks[0].answer == "Print the label,\nthen mail it." and chunks[0].entity is None
    assert chunks[1].entity == "Acme"
    assert [m.split(":")[1] for m in problems.messages] == ["4", "5"]


def test_csv_without_question_column_is_rejected_whole():
    problems = Problems()
    assert parse_faq_csv("x.csv", "q,a\nhi,there\n", problems) == []
    assert "needs 'question' and 'answer'" in problems.messages[0]


def test_bad_files_empty_binary_non_utf8(tmp_path):
    (tmp_path / "empty.md").write_text("  \n")
    (tmp_path / "binary.md").write_bytes(b"\x89PNG\x00\x00\x01")
    (tmp_path / "latin1.md").write_bytes("# Café\n\nprix: 5 €\n".encode("cp1252"))
    (tmp_path / "good.md").write_text("\ufeff# Hello\n\nWorld\n", encoding="utf-8")
    problems = Problems()
    assert read_text(tmp_path / "empty.md", "empty.md", problems)[0] is None
    assert read_text(tmp_path / "binary.md", "binary.md", problems)[0] is None
    text, digest = read_text(tmp_path / "latin1.md", "latin1.md", problems)
    assert text is None and len(digest) == 64
    assert read_text(tmp_path / "good.md", "good.md", problems)[0].startswith("# Hello")  # BOM stripped
    assert [m.split(":")[0] for m in problems.messages] == ["empty.md", "binary.md", "latin1.md"]
    assert "not UTF-8" in problems.messages[2]


def test_scan_ignores_symlinks_escapes_huge_and_unsupported_files(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("# Secret\n\npassword is hunter2\n")
    kb = tmp_path / "kb"
    (kb / "sub").mkdir(parents=True)
    (kb / "a.md").write_text("# A\n\ntext\n")
    (kb / "sub" / "b.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    (kb / "huge.txt").write_bytes(b"x" * (2 * MB))
    (kb / "photo.pdf").write_bytes(b"%PDF")
    (kb / "LICENSE").write_text("MIT")
    (kb / ".hidden.md").write_text("# hidden")
    os.symlink(outside / "secret.md", kb / "link.md")
    os.symlink(outside, kb / "linked_dir")
    problems = Problems()
    found = scan_folder(kb, 1 * MB, problems)
    assert sorted(found) == ["a.md", "sub/b.jsonl"]
    text = "\n".join(problems.messages)
    assert "link.md" in text and "linked_dir" in text and "huge.txt" in text and "photo.pdf" in text
    assert "LICENSE" not in text and ".hidden" not in text


def test_missing_folder_is_reported_not_fatal(tmp_path):
    problems = Problems()
    assert scan_folder(tmp_path / "nope", MB, problems) == {}
    assert "does not exist" in problems.messages[0]


def test_default_knowledge_base_is_the_abcd_shop_with_its_notice():
    kb = REPO_ROOT / "knowledge"
    problems = Problems()
    files = scan_folder(kb, 20 * MB, problems)
    assert problems.messages == []
    assert len(files) == 10  # one article per ABCD flow
    notice = (kb / "NOTICE").read_text()
    assert "asappresearch/abcd" in notice and "MIT" in notice and "Permission is hereby granted" in notice
    chunks = [c for rel in files for c in parse_file(rel, (kb / rel).read_text(), 1200, problems)]
    assert len(chunks) >= 55  # at least one chunk per ABCD subflow
    titles = " | ".join(c.title for c in chunks)
    for subflow_topic in ("Start a refund", "I forgot my password", "My item has not arrived", "Asking for more time"):
        assert subflow_topic in titles
    assert not any("Oracle" in c.text or "[" in c.text for c in chunks)  # agent-only tooling left out


@pytest.mark.parametrize("suffix", [".md", ".txt"])
def test_text_files_chunk(suffix):
    chunks = parse_file(f"notes{suffix}", "First para.\n\nSecond para.\n", 1200, Problems())
    assert len(chunks) == 1 and "Second para." in chunks[0].text and chunks[0].title == "notes"
