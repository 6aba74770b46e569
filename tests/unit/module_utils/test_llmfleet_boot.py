"""Token edits of a kernel command line: untouched tokens keep their order and spacing byte for byte."""

from __future__ import annotations

import pytest
from ansible.module_utils.llmfleet_boot import CmdlineError, plan_cmdline, tokens

from tests.fakehw import PI5_CMDLINE_TXT

MEMORY = {"present": ["cgroup_enable=memory"], "absent": ["cgroup_disable=memory"]}


def test_added_token_goes_last_and_every_other_token_keeps_its_place():
    plan = plan_cmdline(PI5_CMDLINE_TXT, **MEMORY)
    assert plan.after == PI5_CMDLINE_TXT.rstrip("\n") + " cgroup_enable=memory\n"
    assert tokens(plan.after)[:-1] == tokens(PI5_CMDLINE_TXT)
    assert (plan.added, plan.removed, plan.changed) == (["cgroup_enable=memory"], [], True)


def test_second_edit_changes_nothing():
    once = plan_cmdline(PI5_CMDLINE_TXT, **MEMORY, parameters={"cpufreq.default_governor": "performance"})
    twice = plan_cmdline(once.after, **MEMORY, parameters={"cpufreq.default_governor": "performance"})
    assert twice.changed is False
    assert twice.after == once.after
    assert (twice.added, twice.removed) == ([], [])


def test_odd_whitespace_quotes_and_no_final_newline_survive():
    text = '\tconsole=tty1   root=/dev/sda2  dyndbg="file x.c +p"\tquiet  '
    plan = plan_cmdline(text, present=["cgroup_enable=memory"])
    assert plan.after == '\tconsole=tty1   root=/dev/sda2  dyndbg="file x.c +p"\tquiet cgroup_enable=memory  '
    assert tokens(plan.after)[2] == 'dyndbg="file x.c +p"'


def test_removal_takes_the_whitespace_before_the_token():
    assert plan_cmdline("a  cgroup_disable=memory b\n", absent=["cgroup_disable=memory"]).after == "a b\n"
    assert plan_cmdline("cgroup_disable=memory  a b\n", absent=["cgroup_disable=memory"]).after == "a b\n"
    assert plan_cmdline("a b x x\n", absent=["x"]).after == "a b\n"


def test_parameter_is_replaced_in_place_and_duplicates_go():
    text = "quiet cpufreq.default_governor=ondemand splash cpufreq.default_governor=powersave\n"
    plan = plan_cmdline(text, parameters={"cpufreq.default_governor": "performance"})
    assert plan.after == "quiet cpufreq.default_governor=performance splash\n"
    assert plan.added == ["cpufreq.default_governor=performance"]
    assert plan.removed == ["cpufreq.default_governor=ondemand", "cpufreq.default_governor=powersave"]


def test_repeatable_key_is_added_beside_another_value():
    plan = plan_cmdline("cgroup_enable=cpuset rootwait\n", present=["cgroup_enable=memory"])
    assert plan.after == "cgroup_enable=cpuset rootwait cgroup_enable=memory\n"


def test_empty_parameter_value_is_a_flag():
    assert plan_cmdline("rootwait\n", parameters={"quiet": None}).after == "rootwait quiet\n"


def test_a_second_line_is_refused_with_the_fix():
    with pytest.raises(
        CmdlineError, match=r"more than one line \(the next one starts 'quiet'\).*Join the lines"
    ):
        plan_cmdline("console=tty1 root=/dev/sda2\nquiet\n", present=["x"])
    assert plan_cmdline("rootwait\n\n  \n", present=["x"]).after == "rootwait x\n\n  \n"


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"present": ["a=1 b=2"]}, "present has 'a=1 b=2', which is not one kernel parameter"),
        ({"absent": [""]}, "absent has '', which is not one kernel parameter"),
        ({"present": ["quiet"], "absent": ["quiet"]}, "quiet is in both present and absent"),
        ({"parameters": {"a=b": "1"}}, "parameters has the key 'a=b'"),
        ({"present": ["a=1"], "parameters": {"a": "2"}}, "present has a=1 and parameters sets a"),
        ({"absent": ["a=1"], "parameters": {"a": "1"}}, "parameters sets a=1, which absent removes"),
    ],
)
def test_contradictory_or_malformed_requests_are_refused(request_, message):
    with pytest.raises(CmdlineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_cmdline("rootwait\n", **request_)
