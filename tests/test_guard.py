"""The faithfulness guard and the evidence it checks against (no model: these are text rules)."""
from __future__ import annotations

import pytest

from chatapp.evidence import Evidence, EvidenceSelector, conditions, extractive_answer, split_units
from chatapp.guard import StreamGuard, check, claims

EVIDENCE = ["Shipping costs are too high: Out for delivery or delivered: we refund part of it: standard shipping is "
            "$8.00.", "Silver members can return items within 6 months."]


@pytest.mark.parametrize("answer", ["We refund $8 of it.", "We refund $8.00 of it.", "We refund eight dollars.",
                                    "We refund 8 dollars.", "Returns are accepted for 6 months.",
                                    "Returns are accepted for six months.", "退货期限是六个月。", "运费退还8美元。"])
def test_supported_claims_are_kept(answer):
    verdict = check(answer, EVIDENCE)
    assert verdict.claims, answer
    assert verdict.supported, verdict.unsupported


@pytest.mark.parametrize("answer, claim", [("The standard refund is $12.", "$12"),
                                           ("We refund twelve dollars.", "twelve dollars"),
                                           ("You can return it within 90 days.", "90 days"),
                                           ("Gold members get 10% off.", "10%"),
                                           ("退货期限是三个月。", "三个月"),
                                           ("We also give you a discount.", "discount")])
def test_invented_claims_are_flagged(answer, claim):
    verdict = check(answer, EVIDENCE)
    assert claim in verdict.unsupported


def test_the_conversation_supports_what_the_customer_said():
    assert check("You were overcharged by $5, so you get it back.", ["I was overcharged by $5."]).supported
    assert not check("You were overcharged by $5.", ["I was overcharged."]).supported


POLICY = ["Bronze and Guest members cannot get an extension. You can ask for a manager to call you back.",
          "Gold members get the refund at once; other members do not.",
          "Once it is in transit, the date can no longer be changed."]


@pytest.mark.parametrize("answer, flipped", [
    ("Bronze and Guest members can get an extension.", "Bronze and Guest members can get an extension"),
    ("Once it is in transit, the date can still be changed.", "the date can still be changed"),
    ("You cannot ask for a manager to call you back.", "You cannot ask for a manager to call you back"),
])
def test_a_policy_repeated_with_its_negation_flipped_is_flagged(answer, flipped):
    assert any(flipped in claim for claim in check(answer, POLICY).unsupported)


@pytest.mark.parametrize("answer", [
    "Bronze and Guest members can't get an extension, but you can ask for a manager to call you back.",
    "Unfortunately, as a Bronze member you cannot get an extension.",
    "Gold members get the refund at once.",  # the other clause of that sentence is the negated one
    "No, the date can no longer be changed once it is in transit.",
    "We can help: ask us and we check your order.",  # says nothing the references say
])
def test_a_policy_repeated_with_its_own_polarity_is_kept(answer):
    assert check(answer, POLICY).supported, check(answer, POLICY).unsupported


def test_stream_guard_never_shows_a_flipped_policy():
    guard = StreamGuard(POLICY)
    assert guard.feed("Bronze and Guest members can get an extension. Anything else?") == ""
    assert guard.failed == ["Bronze and Guest members can get an extension"]


def test_amounts_are_canonical():
    assert [c.value for c in claims("$8, $8.00, 8 dollars, eight dollars, 8元")] == [8.0] * 5
    assert [c.value for c in claims("6 months, six months, 六个月, 180 days")] == [180.0] * 4
    assert claims("your username is hchen1") == []


def test_stream_guard_never_shows_an_unsupported_sentence():
    guard = StreamGuard(EVIDENCE)
    text, shown = "", []
    for piece in ["Sure", "! We", " refund", " part:", " $", "8", ".00", " of", " it.", " Also", " $12", " more."]:
        text += piece
        shown.append(guard.feed(text))
    assert all("$12" not in s for s in shown)
    assert "We refund part: $8.00 of it." in shown[-1]
    assert guard.failed == ["$12"]
    assert not guard.finish(text).supported


def test_stream_guard_holds_a_claim_until_its_sentence_is_checked():
    guard = StreamGuard(EVIDENCE)
    assert guard.feed("The fee is $8") == "The fee is "
    assert guard.feed("The fee is $8.00 for delivered orders. Thanks") == "The fee is $8.00 for delivered orders."


def test_units_and_conditions():
    text = ("Whether we can extend your payment date depends on your membership level:\n\n- **Gold** members can "
            "always get an extension.\n- **Bronze and Guest** members cannot get an extension. You can ask for a\n"
            "  manager to call you back.")
    units = split_units(text)
    assert "Gold members can always get an extension." in units
    assert any(u.startswith("Bronze and Guest members cannot") and u.endswith("call you back.") for u in units)
    assert conditions("I'm a gold member")["member"] == {"gold"}
    assert conditions("我是铜卡会员")["member"] == {"bronze"}
    assert conditions("My order hasn't shipped yet")["status"] == {"received"}


def test_selector_prefers_the_customers_own_membership_level():
    from chatapp.retrieval import Hit

    hit = Hit("kb.md#3", "kb.md", "Subscription › Asking for more time to pay",
              "- **Gold** members can always get an extension.\n- **Bronze and Guest** members cannot get an "
              "extension.", 1.0, "doc")
    selector = EvidenceSelector(embedder=None)
    assert selector.select("I'm a guest. Can I get more time to pay?", [], [hit])[0].text.startswith("Bronze")
    assert selector.select("I'm gold. Can I get more time to pay?", [], [hit])[0].text.startswith("Gold")
    history = [{"role": "user", "content": "Hi, I'm a gold member."}, {"role": "assistant", "content": "Hello!"}]
    assert selector.select("Can I get more time to pay?", history, [hit])[0].text.startswith("Gold")


def test_selector_prefers_the_unit_whose_condition_the_customer_states():
    from chatapp.retrieval import Hit

    hit = Hit("kb.md#4", "kb.md", "Subscription › Billing",
              "If you were overcharged, we refund the difference on your bill. If you have not paid yet, we correct "
              "the amount.", 1.0, "doc")
    selector = EvidenceSelector(embedder=None)  # the same word overlap for both units: only the condition differs
    question = "Is the difference on my bill refunded?"
    assert selector.select(f"I have not paid yet. {question}", [], [hit])[0].text.startswith("If you have not")
    assert selector.select(f"I was overcharged. {question}", [], [hit])[0].text.startswith("If you were")


def test_grounded_questions_state_a_units_condition_in_the_first_person():
    from chatapp.seed_data.grounded import first_person

    assert first_person("you have not paid the bill yet") == "I have not paid the bill yet"
    assert first_person("your order is late and you're a gold member") == "My order is late and I'm a gold member"


def test_extractive_answer_cites_its_heading():
    unit = Evidence("Gold members can always get an extension.", "Asking for more time to pay", "kb.md", "kb.md#3~1",
                    "kb.md#3")
    answer = extractive_answer([unit])
    assert answer == 'From our help article "Asking for more time to pay": Gold members can always get an extension.'
    assert check(answer, [unit.text]).supported
    assert extractive_answer([]) == ""


def test_a_decline_is_recognised_only_before_an_answer():
    from chatapp.guard import declines

    assert declines("I'm not sure about that, and I'd rather not guess. Would you like a person?")
    assert declines("We're happy to help! Would you like me to connect you with a member of our support team?")
    assert not declines("If you don't have a receipt, returns are within 30 days. Shall I connect you with a person?")
    assert not declines("Sure!")
    assert declines("抱歉，我不确定这个问题的答案。需要为您转接人工客服吗？")
    assert not declines("铜卡会员升级隔夜送达需要支付 20 美元。")


def test_stream_guard_holds_an_answer_until_it_is_known_not_to_decline():
    guard = StreamGuard(["Guest: returns within 30 days."], hold_declines=True)
    assert guard.feed("Sure! ") == ""  # a greeting says nothing yet
    assert guard.feed("Sure! Guests can return the items") == ""  # an unfinished sentence must say more
    text = "Sure! Guests can return the items they bought from us in the store or by"
    assert guard.feed(text) == "Sure! Guests can return the items they bought from us in the store or"
    assert not guard.declined
    declining = StreamGuard([], hold_declines=True)
    decline = "We're happy to help! Would you like me to connect you with a member of our team?"
    assert all(declining.feed(decline[:n]) == "" for n in range(1, len(decline) + 1))  # token by token: never shown
    assert declining.declined and declining.finish(decline).declined
    assert not StreamGuard([]).finish("I'm not sure.").declined  # without evidence a decline is the right answer
    chinese = StreamGuard(["You can upgrade while the order has not shipped."], hold_declines=True)
    text = "您可以在订单发货之前随时把普通配送升级为隔夜送"
    assert chinese.feed(text) == text[:-1]  # streams before its full stop
