"""``fleetserve serve``'s wait for its endpoint, against a stand-in dashboard and endpoint (no Ray; fast).

The wait ends with Serve's reason as soon as Serve marks an app of this deploy
DEPLOY_FAILED, also where ``/health`` cannot say it (a build that failed leaves
no endpoint; on the direct path HAProxy answers 503 without a reason), and never
takes a failure an earlier deploy of the same name left for this one's. A
redeploy is ready once Serve runs its version, not when the replaced version
answers ``/health``.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cluster.commands.serve_launch import DeployWatch, wait_ready
from cluster.errors import FleetserveError

#: The shape of Serve's message for a build that raised (Ray 2.58): the task's error around the builder's.
BUILD_FAILURE = """Deploying app 'op' failed with exception:
ray.exceptions.RayTaskError(RuntimeError): ray::build_serve_application() (pid=2135, ip=10.203.0.11)
  File "/ray/serve/_private/application_state.py", line 1739, in build_serve_application
    raise RuntimeError(err_str) from None
RuntimeError: Traceback (most recent call last):
  File "/ray/serve/_private/application_state.py", line 1632, in build_serve_application
    app = call_user_app_builder_with_args_if_necessary(
          ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/work/cluster/serving/direct.py", line 309, in compose_direct_app
    raise ConfigError(
cluster.errors.ConfigError: Serve application args: args.data_path: the Ray cluster runs Serve's Python proxy
  fix: start the cluster with RAY_SERVE_ENABLE_HA_PROXY=1 ..."""


class StandIn:
    """A dashboard's Serve route and an endpoint's /health on one local port; tests change ``apps``/``health``."""

    def __init__(self) -> None:
        self.apps: dict = {}
        self.health = 503
        self.health_body: dict = {"status": "starting"}
        self.token_seen: list[str | None] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.path == "/api/serve/applications/":
                    stand_in.token_seen.append(self.headers.get("Authorization"))
                    code, body = 200, {"applications": stand_in.apps}
                else:
                    code, body = stand_in.health, stand_in.health_body
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stand_in():
    s = StandIn()
    yield s
    s.server.shutdown()


def test_a_failure_this_deploy_caused_ends_the_wait_with_serves_reason(stand_in, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("cluster.commands.serve_launch.READY_POLL_S", 0.05)
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    # An earlier deploy of the same name failed; this command has not deployed yet.
    stand_in.apps = {"op": {"status": "DEPLOY_FAILED", "message": "an old reason", "last_deployed_time_s": 1.0},
                     "other": {"status": "DEPLOY_FAILED", "message": "not ours", "last_deployed_time_s": 5.0}}
    watch = DeployWatch(stand_in.url, ["op"], {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)})
    assert watch.check()[1] is None, "the earlier deploy's failure is not this one's"
    assert set(stand_in.token_seen) == {"Bearer secret-token"}
    # Serve would not attempt the failed app's unchanged config again: it gets a fresh attempt, others nothing.
    assert list(watch.retry_env("op")) == ["FLEETSERVE_DEPLOY_ATTEMPT"] and watch.retry_env("other") == {}

    stand_in.apps["op"] = {"status": "DEPLOY_FAILED", "message": BUILD_FAILURE, "last_deployed_time_s": 2.0,
                           "deployments": {"FleetLLMServer:m": {"status": "DEPLOY_FAILED",
                                                                "message": "model.source '/x' is not a directory"},
                                           "Healthy": {"status": "HEALTHY", "message": ""}}}
    with pytest.raises(FleetserveError) as err:
        wait_ready(stand_in.url, 60, None, watch)
    reason = str(err.value)
    assert reason.startswith("deployment failed: application op: Deploying app 'op' failed with exception:")
    assert "args.data_path" in reason and "fix: start the cluster" in reason and "model.source '/x'" in reason
    assert "Traceback" not in reason and "application_state.py" not in reason and "RayTaskError" not in reason
    assert "not ours" not in reason


def test_a_redeploy_is_ready_once_serve_runs_the_new_version_not_when_the_old_one_answers(stand_in,
                                                                                         monkeypatch) -> None:
    monkeypatch.setattr("cluster.commands.serve_launch.READY_POLL_S", 0.05)
    # A version of the app runs and answers /health before this command deploys.
    stand_in.apps = {"op": {"status": "RUNNING", "message": "", "last_deployed_time_s": 1.0}}
    stand_in.health = 200
    watch = DeployWatch(stand_in.url, ["op"], {})
    # Serve stamps the deploy, builds the new version and rolls replicas; the old ones answer meanwhile.
    timeline = [{"status": "RUNNING", "last_deployed_time_s": 1.0},  # the deploy has not reached Serve
                {"status": "DEPLOYING", "last_deployed_time_s": 2.0},
                {"status": "DEPLOYING", "last_deployed_time_s": 2.0},
                {"status": "RUNNING", "last_deployed_time_s": 2.0}]
    seen = []
    original = watch.check

    def next_state_then_check():
        stand_in.apps = {"op": {"message": "", **timeline[len(seen)]}}
        pending, failure = original()
        seen.append(pending)
        return pending, failure

    watch.check = next_state_then_check
    assert wait_ready(stand_in.url, 60, None, watch) is True
    assert seen == ["op: not deployed yet", "op: DEPLOYING", "op: DEPLOYING", None]


def test_a_redeploy_that_never_comes_up_times_out_saying_so(stand_in) -> None:
    stand_in.apps = {"op": {"status": "RUNNING", "message": "", "last_deployed_time_s": 1.0}}
    stand_in.health = 200
    watch = DeployWatch(stand_in.url, ["op"], {})
    stand_in.apps["op"] = {"status": "DEPLOYING", "message": "", "last_deployed_time_s": 2.0}
    with pytest.raises(FleetserveError, match="200, but Serve has not run this deploy yet: op: DEPLOYING"):
        wait_ready(stand_in.url, 0.3, None, watch)


def test_the_replaced_versions_failed_health_is_not_this_deploys_failure(stand_in, monkeypatch) -> None:
    """An app that had failed keeps answering /health with its old reason until its new version replaces it."""
    monkeypatch.setattr("cluster.commands.serve_launch.READY_POLL_S", 0.05)
    stand_in.apps = {"op": {"status": "DEPLOY_FAILED", "message": "old", "last_deployed_time_s": 1.0}}
    stand_in.health_body = {"status": "failed", "models": {"op-missing": {"state": "failed", "reason": "old reason"}}}
    # Without Serve's details, /health is all there is to go by.
    with pytest.raises(FleetserveError, match="op-missing: old reason"):
        wait_ready(stand_in.url, 60, None, None)

    watch = DeployWatch(stand_in.url, ["op"], {})
    stand_in.apps["op"] = {"status": "DEPLOYING", "message": "", "last_deployed_time_s": 2.0}
    polls = []
    original = watch.check

    def check_then_new_version_up():
        polls.append(1)
        if len(polls) == 3:
            stand_in.apps["op"]["status"] = "RUNNING"
            stand_in.health, stand_in.health_body = 200, {"status": "healthy"}
        return original()

    watch.check = check_then_new_version_up
    assert wait_ready(stand_in.url, 60, None, watch) is True
    assert len(polls) == 3


def test_a_new_app_has_no_older_version_so_health_speaks_for_it(stand_in, monkeypatch) -> None:
    monkeypatch.setattr("cluster.commands.serve_launch.READY_POLL_S", 0.05)
    stand_in.apps = {"other": {"status": "RUNNING", "message": "", "last_deployed_time_s": 1.0}}
    watch = DeployWatch(stand_in.url, ["op"], {})
    # Serve still DEPLOYING (say, a second replica waits for resources): the first 200 is this deploy's.
    stand_in.apps["op"] = {"status": "DEPLOYING", "message": "", "last_deployed_time_s": 2.0}
    stand_in.health = 200
    assert wait_ready(stand_in.url, 60, None, watch) is True
    # A replica's own verdict (the direct path's engine check) ends the wait before Serve's retries do.
    stand_in.health, stand_in.health_body = 503, {"models": {"op": {"state": "failed", "reason": "engine dead"}}}
    with pytest.raises(FleetserveError, match="op: engine dead"):
        wait_ready(stand_in.url, 60, None, watch)


def test_serves_details_lost_mid_deploy_leave_the_decision_to_health(stand_in, monkeypatch) -> None:
    monkeypatch.setattr("cluster.commands.serve_launch.READY_POLL_S", 0.05)
    stand_in.apps = {"op": {"status": "RUNNING", "message": "", "last_deployed_time_s": 1.0}}
    watch = DeployWatch(stand_in.url, ["op"], {})
    stand_in.health = 200
    stand_in.server.shutdown()
    stand_in.server.server_close()
    endpoint = StandIn()
    endpoint.health = 200
    try:
        # /health from a live endpoint, Serve's details from a dashboard that went away.
        assert wait_ready(endpoint.url, 60, None, watch) is True
        assert not watch.active
    finally:
        endpoint.server.shutdown()


def test_without_serves_details_before_the_deploy_the_watch_stays_out(stand_in) -> None:
    """Unread before, a failure seen after could be an earlier deploy's: only /health decides then."""
    closed = StandIn()
    closed.server.shutdown()
    closed.server.server_close()
    watch = DeployWatch(closed.url, ["op"], {})
    assert watch.check() == (None, None) and watch.retry_env("op") == {}
    stand_in.apps = {"op": {"status": "DEPLOY_FAILED", "message": "x", "last_deployed_time_s": 9.0}}
    watch.dashboard_url = stand_in.url  # readable now, but nothing to compare with
    assert watch.check() == (None, None)
    assert DeployWatch(None, ["op"], {}).check()[1] is None  # an address with no dashboard to ask (auto, ray://)
