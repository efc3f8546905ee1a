"""The harness's own tests, a package so that their module names (tests.test_perf) may repeat those of cases/."""
