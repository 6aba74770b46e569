"""The tuning_facts module, built and run as Ansible runs it, against fake trees."""

from __future__ import annotations


def test_module_returns_the_facts_of_the_fake_pi(run_module, pi5):
    result = run_module("tuning_facts", {"root": str(pi5)})
    assert result["changed"] is False
    tuning = result["ansible_facts"]["tuning"]
    assert tuning["board"]["raspberry_pi_generation"] == 5
    assert tuning["cpufreq"]["governor"] == "ondemand"
    assert tuning["swap"]["zram"] is True
    assert tuning["throttled"] == {"available": False}


def test_module_runs_in_check_mode(run_module, x86):
    result = run_module("tuning_facts", {"root": str(x86)}, check_mode=True)
    assert result["ansible_facts"]["tuning"]["nvidia_gpus"][0]["numa_node"] == 1


def test_module_rejects_unknown_options(run_module, pi5):
    result = run_module("tuning_facts", {"root": str(pi5), "rooot": "/"})
    assert result["failed"] is True
    assert "rooot" in result["msg"]


class FakeAnsibleModule:
    """Just enough of AnsibleModule for read_throttled."""

    def __init__(self, root="/", vcgencmd=True, path="/usr/bin/vcgencmd", rc=0):
        self.params = {"root": root, "vcgencmd": vcgencmd}
        self.path = path
        self.rc = rc
        self.ran = []

    def get_bin_path(self, name):
        return self.path

    def run_command(self, argv):
        self.ran.append(argv)
        return self.rc, "throttled=0x50000\n", ""


def test_read_throttled_runs_vcgencmd_on_the_real_root(library_module):
    module = FakeAnsibleModule()
    assert library_module("tuning_facts").read_throttled(module) == "throttled=0x50000\n"
    assert module.ran == [["/usr/bin/vcgencmd", "get_throttled"]]


def test_read_throttled_skips_fake_roots_missing_commands_failures_and_opt_out(library_module, pi5):
    read_throttled = library_module("tuning_facts").read_throttled
    for module in (
        FakeAnsibleModule(root=str(pi5)),
        FakeAnsibleModule(path=None),
        FakeAnsibleModule(rc=1),
        FakeAnsibleModule(vcgencmd=False),
    ):
        assert read_throttled(module) is None
