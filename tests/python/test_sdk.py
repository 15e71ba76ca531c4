"""The official Python SDK (avisdk's ApiSession) against a real fulcrum binary over HTTPS."""
import base64
import uuid

import pytest
import requests
from avi.sdk.avi_api import ApiSession, ObjectNotFound

from conftest import PASSWORD, build_package


def metric(controller, series):
    text = requests.get(controller.url + "/metrics", verify=False).text
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def session(controller, password=PASSWORD, **kwargs):
    # A fresh session each time: the SDK caches sessions by credentials otherwise.
    kwargs.setdefault("api_version", "30.2.1")
    return ApiSession(controller.url, "admin", password, **kwargs)


def test_login_reports_version_and_tenants(controller):
    api = session(controller)
    details = api.get_controller_details()
    assert details["controller_api_version"]["Version"] == "30.2.1"
    rsp = api.get("tenant", params={"name": "admin"})
    assert rsp.status_code == 200
    assert rsp.json()["results"][0]["uuid"] == "admin"


def test_pool_vsvip_vs_refer_to_each_other_by_url(controller):
    api = session(controller)
    pool = api.post("pool", data={"name": "sdk-pool", "servers": [{"ip": {"addr": "10.90.64.10", "type": "V4"}, "port": 80}]})
    assert pool.status_code == 201, pool.text
    vip = api.post("vsvip", data={"name": "sdk-vip", "vip": [{"vip_id": "0", "ip_address": {"addr": "10.90.64.123", "type": "V4"}}]})
    assert vip.status_code == 201, vip.text
    vs = api.post("virtualservice", data={
        "name": "sdk-vs", "services": [{"port": 80}],
        "pool_ref": api.get_obj_ref(pool.json()), "vsvip_ref": api.get_obj_ref(vip.json()),
        "application_profile_name": "System-HTTP",  # unknown keys are ignored, as the controller does
    })
    assert vs.status_code == 201, vs.text
    got = api.get_object_by_name("virtualservice", "sdk-vs")
    assert got["pool_ref"].endswith("/api/pool/" + pool.json()["uuid"])
    assert got["vsvip_ref"].endswith("/api/vsvip/" + vip.json()["uuid"])
    assert got["application_profile_ref"].split("/api/")[1].startswith("applicationprofile/")
    # The pool cannot go while the VS refers to it.
    rsp = api.delete("pool/" + pool.json()["uuid"])
    assert rsp.status_code == 409 and "sdk-vs" in rsp.text
    for path, name in [("virtualservice", "sdk-vs"), ("pool", "sdk-pool"), ("vsvip", "sdk-vip")]:
        assert api.delete_by_name(path, name).status_code == 204
    assert api.get_object_by_name("virtualservice", "sdk-vs") is None


def test_get_objects_iter_pages_through_450_pools(controller):
    api = session(controller)
    for i in range(450):
        assert api.post("pool", data={"name": "iter-%03d" % i}).status_code == 201
    names = [p["name"] for p in api.get_objects_iter("pool", params={"page_size": 200, "name.contains": "iter-"})]
    assert len(names) == 450 and len(set(names)) == 450
    first = api.get("pool", params={"page_size": 200, "name.contains": "iter-"}).json()
    assert first["count"] == 450 and len(first["results"]) == 200 and "page=2" in first["next"]
    assert api.get("pool", params={"page_size": 201}).status_code == 400


def test_put_by_name_and_stale_put(controller):
    api = session(controller)
    created = api.post("pool", data={"name": "put-me"}).json()
    obj = api.get_object_by_name("pool", "put-me")
    obj["lb_algorithm"] = "LB_ALGORITHM_ROUND_ROBIN"
    rsp = api.put_by_name("pool", "put-me", data=obj)
    assert rsp.status_code == 200, rsp.text
    assert rsp.json()["lb_algorithm"] == "LB_ALGORITHM_ROUND_ROBIN"
    assert int(rsp.json()["_last_modified"]) > int(created["_last_modified"])
    # PUT the old copy again: its _last_modified is stale now.
    stale = api.put("pool/" + created["uuid"], data=dict(obj, _last_modified=created["_last_modified"]))
    assert stale.status_code == 412
    assert api.delete_by_name("pool", "put-me").status_code == 204
    with pytest.raises(ObjectNotFound):
        api.delete_by_name("pool", "put-me")


def test_force_uuid(controller):
    api = session(controller)
    rsp = api.post("pool", data={"name": "forced"}, force_uuid="pool-force-42")
    assert rsp.status_code == 201
    assert rsp.json()["uuid"] == "pool-force-42"
    assert api.get_object_by_name("pool", "forced")["uuid"] == "pool-force-42"
    assert api.delete_by_name("pool", "forced").status_code == 204


def test_second_tenant_is_isolated(controller):
    api = session(controller)
    tenant = api.post("tenant", data={"name": "sdk-tenant"})
    assert tenant.status_code == 201 and tenant.json()["uuid"].startswith("tenant-")
    rsp = api.post("pool", data={"name": "tenant-pool"}, tenant="sdk-tenant")
    assert rsp.status_code == 201, rsp.text
    assert api.get_object_by_name("pool", "tenant-pool") is None
    assert api.get_object_by_name("pool", "tenant-pool", tenant="sdk-tenant")["uuid"] == rsp.json()["uuid"]
    assert api.get_object_by_name("pool", "tenant-pool", tenant_uuid=tenant.json()["uuid"]) is not None
    # Same name in the admin tenant is fine; a tenant that holds objects cannot be deleted.
    assert api.post("pool", data={"name": "tenant-pool"}).status_code == 201
    assert api.delete_by_name("tenant", "sdk-tenant").status_code == 409
    assert api.delete_by_name("pool", "tenant-pool", tenant="sdk-tenant").status_code == 204
    assert api.delete_by_name("pool", "tenant-pool").status_code == 204
    assert api.delete_by_name("tenant", "sdk-tenant").status_code == 204


def test_recovers_from_a_corrupted_csrf_token(controller):
    api = session(controller)
    api.get("pool")
    # Corrupt the token the SDK keeps for its session (it sends it as header and cookie).
    from avi.sdk import avi_api
    avi_api.sessionDict[api.key]["csrftoken"] = "invalid"
    refused_before = metric(controller, 'fulcrum_http_requests_total{route="/api/tenant",status="401"}')
    rsp = api.post("tenant", data={"name": "tenant1", "local": "true"})
    assert rsp.status_code == 201, rsp.text
    # The first attempt was refused and the SDK logged in again.
    assert metric(controller, 'fulcrum_http_requests_total{route="/api/tenant",status="401"}') == refused_before + 1
    assert api.delete_by_name("tenant", "tenant1").status_code == 204


def test_bad_csrf_token_is_401(controller):
    s = requests.Session()
    s.verify = False
    login = s.post(controller.url + "/login", data={"username": "admin", "password": PASSWORD})
    assert login.status_code == 200 and "csrftoken" in login.cookies and "avi-sessionid" in login.cookies
    rsp = s.post(controller.url + "/api/pool", json={"name": "x"}, headers={"X-CSRFToken": "invalid", "Referer": controller.url})
    assert rsp.status_code == 401 and "CSRF" in rsp.json()["error"]
    ok = s.post(controller.url + "/api/pool", json={"name": "csrf-ok"}, headers={"X-CSRFToken": login.cookies["csrftoken"]})
    assert ok.status_code == 201
    assert s.delete(controller.url + "/api/pool/" + ok.json()["uuid"], headers={"X-CSRFToken": login.cookies["csrftoken"]}).status_code == 204


def test_basic_auth_session(controller):
    token = base64.b64encode(("admin:" + PASSWORD).encode()).decode()
    api = ApiSession(controller.url, "admin", PASSWORD, api_version="30.2.1",
                     user_hdrs={"Authorization": "Basic " + token})
    rsp = api.post("pool", data={"name": "basic-pool"})
    assert rsp.status_code == 201, rsp.text
    assert api.get("pool", params={"name": "basic-pool"}).json()["count"] == 1
    assert api.delete_by_name("pool", "basic-pool").status_code == 204


def test_context_sharing_and_cluster_endpoints(controller):
    api = session(controller)
    from avi.sdk import avi_api
    cached = avi_api.sessionDict[api.key]
    shared = ApiSession(controller.url, "admin", session_id=cached["session_id"], csrftoken=cached["csrftoken"],
                        api_version="30.2.1")
    assert shared.get("pool").status_code == 200
    runtime = api.get("/cluster/runtime").json()  # the SDK's own tests send /api//cluster/runtime
    assert runtime["node_info"]["cluster_uuid"].startswith("cluster-")
    assert [n["role"] for n in runtime["node_states"]].count("CLUSTER_LEADER") == 1
    assert api.get("/cluster/version").json()["Version"] == "30.2.1"
    assert api.get("/systemconfiguration").json()["default_license_tier"] in ("ENTERPRISE", "ENTERPRISE_WITH_CLOUD_SERVICES")


def test_invalid_version_is_reported(controller):
    api = session(controller, api_version="not-a-version")
    rsp = api.get("pool")
    assert rsp.status_code == 400 and "Invalid version" in rsp.text


def test_password_change_and_new_login(controller):
    api = session(controller)
    new = "N3w-password!"
    assert api.put("useraccount", data={"old_password": PASSWORD, "password": new}).status_code == 200
    api2 = session(controller, password=new)
    assert api2.get("pool").status_code == 200
    # The SDK sends an empty PUT of systemconfiguration in its own tests.
    assert api2.put("systemconfiguration").status_code == 200
    assert api2.put("useraccount", data={"old_password": new, "password": PASSWORD}).status_code == 200
    assert session(controller).get("pool").status_code == 200
    r = requests.post(controller.url + "/login", data={"username": "admin", "password": new}, verify=False)
    assert r.status_code == 401


def test_patch_classic_and_json_patch_forms(controller):
    api = session(controller)
    pool = api.post("pool", data={"name": "sdk-patch"}).json()
    rsp = api.patch("pool/" + pool["uuid"], data={"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}},
                                                                     {"ip": {"addr": "1.1.1.2", "type": "V4"}}]}})
    assert rsp.status_code == 200, rsp.text
    assert [s["port"] for s in rsp.json()["servers"]] == [80, 80]
    rsp = api.patch("pool/" + pool["uuid"], data={"add": {"servers": [{"ip": {"addr": "1.1.1.1", "type": "V4"}, "ratio": 10}]}})
    assert [s["ratio"] for s in rsp.json()["servers"]] == [10, 1]
    # The SDK sample (patch_api_example.py) sends json_patch to /api//pool/<uuid>.
    rsp = api.patch("/pool/" + pool["uuid"], data={"json_patch": [
        {"op": "add", "path": "/servers", "value": [{"ip": {"addr": "1.1.1.3", "type": "V4"}}]}]})
    assert rsp.status_code == 200, rsp.text
    assert len(rsp.json()["servers"]) == 3
    rsp = api.patch("/pool/" + pool["uuid"], data={"json_patch": [{"op": "remove", "path": "/servers/1.1.1.2:80"}]})
    assert [s["ip"]["addr"] for s in rsp.json()["servers"]] == ["1.1.1.1", "1.1.1.3"]
    rsp = api.patch("/pool/" + pool["uuid"], data={"json_patch": [
        {"op": "replace", "path": "/servers/1.1.1.3:80", "value": {"ip": {"addr": "1.1.1.3", "type": "V4"}, "ratio": 4},
         "server_key": "server-1"}]})
    assert rsp.json()["servers"][1]["ratio"] == 4
    bad = api.patch("pool/" + pool["uuid"], data={"add": {"servers": [{"ip": {"addr": "1.1.1.9", "type": "V4"}, "ratio": 25}]}})
    assert bad.status_code == 400 and "out of range" in bad.text
    assert len(api.get("pool/" + pool["uuid"]).json()["servers"]) == 2
    assert api.delete_by_name("pool", "sdk-patch").status_code == 204


def upload_session(controller):
    """Where images are uploaded: the leader (on a follower the SDK gets a 421 naming it)."""
    return ApiSession(controller.upload_url, "admin", PASSWORD, api_version="30.2.1")


def test_image_upload_query_and_delete_through_the_sdk(controller):
    api = session(controller)
    path, tag, digest = build_package(controller, "se_patch", "30.2.6", "2p1")
    if controller.follower:
        with open(path, "rb") as f:
            refused = api.post("image", files={"file": ("se_patch.pkg", f, "application/octet-stream")})
        assert refused.status_code == 421, refused.text
        assert controller.upload_url in refused.text, refused.text
    with open(path, "rb") as f:
        resp = upload_session(controller).post("image", files={"file": ("se_patch.pkg", f, "application/octet-stream")})
    assert resp.status_code == 201, resp.text
    image = api.get_object_by_name("image", tag)
    assert image["type"] == "IMAGE_TYPE_PATCH"
    assert image["img_state"]["state"] == "IMAGE_FSM_COMPLETED"
    assert image["se_info"]["hash"] == digest
    assert image["se_info"]["build"]["patch_version"] == "2p1"
    # Clients pick images by type and by the version in the name, then use the uuid.
    patches = [i for i in api.get_objects_iter("image") if i["type"] == "IMAGE_TYPE_PATCH" and "30.2.6" in i["name"]]
    assert [i["uuid"] for i in patches] == [image["uuid"]]
    # The same tag again is a conflict; a corrupt file is refused.
    uploads = upload_session(controller)
    with open(path, "rb") as f:
        again = uploads.post("image", files={"file": ("se_patch.pkg", f, "application/octet-stream")})
    assert again.status_code == 409, again.text
    bad = uploads.post("image", files={"file": ("junk.pkg", b"not a package" * 100, "application/octet-stream")})
    assert bad.status_code == 400, bad.text
    assert "not a Fulcrum package" in bad.text, bad.text  # the SDK's json() raises on errors
    assert api.delete_by_name("image", tag).status_code == 204
    assert api.get_object_by_name("image", tag) is None


def test_service_engines_through_the_sdk(controller, tmp_path):
    """The SDK's usage-meter call, a join token, a real agent, its SE and a VS's runtime."""
    import subprocess
    import time

    from conftest import BINARY

    api = session(controller)
    assert api.get("licenseusage").json()["licensed_cores"]  # the SDK's own usage test reads this
    token = api.post("sejointoken", data={"se_group_ref": "/api/serviceenginegroup?name=Default-Group"}).json()
    assert "token" in token
    agent = subprocess.Popen(
        [BINARY, "se-agent", "--controller", controller.url, "--join-token", token["token"],
         "--data-dir", str(tmp_path / "se"), "--name", "sdk-se", "--cores", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        se = None
        while time.time() < deadline:
            se = api.get_object_by_name("serviceengine", "sdk-se")
            if se and se.get("oper_status", {}).get("state") == "OPER_UP":
                break
            time.sleep(0.2)
        assert se["oper_status"]["state"] == "OPER_UP"
        assert se["version"] == "30.2.1"
        vs = api.post("virtualservice", data={"name": "sdk-vs-se", "services": [{"port": 8080}]}).json()
        runtime = None
        while time.time() < deadline:
            runtime = api.get("virtualservice/%s/runtime" % vs["uuid"]).json()
            if runtime["oper_status"]["state"] == "OPER_UP":
                break
            time.sleep(0.2)
        assert runtime["vip_summary"][0]["service_engine"][0]["uuid"] == se["uuid"]
        check_traffic_through_the_se(api, time.time() + 30)
        assert api.delete("serviceengine/%s" % se["uuid"]).status_code == 204
        assert agent.wait(timeout=20) != 0, "a deleted SE's agent is cut off"
        assert api.delete_by_name("virtualservice", "sdk-vs-se").status_code == 204
        assert api.delete("sejointoken/%s" % token["uuid"]).status_code == 204
    finally:
        agent.kill()
        agent.wait()


def check_traffic_through_the_se(api, deadline):
    """A virtual service on a VIP of 127.0.0.0/8 serves a pool server started here, through the
    agent's data plane; the pool's and the virtual service's runtime say so."""
    import http.server
    import socket
    import threading
    import time

    class Hello(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"hello from the pool"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    backend = http.server.ThreadingHTTPServer(("127.0.0.151", 0), Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        server = {"ip": {"addr": "127.0.0.151", "type": "V4"}, "port": backend.server_address[1]}
        pool = api.post("pool", data={"name": "sdk-traffic", "servers": [server]}).json()
        vip = api.post("vsvip", data={"name": "sdk-traffic-vip",
                                      "vip": [{"vip_id": "0", "ip_address": {"addr": "127.0.0.152", "type": "V4"}}]}).json()
        with socket.socket() as s:
            s.bind(("127.0.0.152", 0))
            port = s.getsockname()[1]
        vs = api.post("virtualservice", data={"name": "sdk-traffic-vs", "services": [{"port": port}],
                                              "pool_ref": pool["url"], "vsvip_ref": vip["url"]}).json()
        answer = None
        while time.time() < deadline and answer is None:
            try:
                answer = requests.get("http://127.0.0.152:%d/" % port, timeout=2).text
            except requests.RequestException:
                time.sleep(0.2)
        assert answer == "hello from the pool"
        servers, stats = [], {}
        while time.time() < deadline:
            servers = api.get("pool/%s/runtime/server" % pool["uuid"]).json()
            stats = api.get("virtualservice/%s/runtime" % vs["uuid"]).json()["stats"]
            if servers and servers[0]["oper_status"]["state"] == "OPER_UP" and stats["requests"] >= 1:
                break
            time.sleep(0.2)
        assert servers[0]["oper_status"]["state"] == "OPER_UP", servers
        assert servers[0]["ip_addr"]["addr"] == "127.0.0.151"
        assert stats["requests"] >= 1, stats
        assert api.get("pool/%s/runtime" % pool["uuid"]).json()["num_servers_up"] == 1
        for kind, name in [("virtualservice", "sdk-traffic-vs"), ("vsvip", "sdk-traffic-vip"), ("pool", "sdk-traffic")]:
            assert api.delete_by_name(kind, name).status_code == 204
    finally:
        backend.shutdown()


def test_upgrade_preview_and_status_through_the_sdk(controller):
    api = session(controller)
    path, tag, _ = build_package(controller, "controller", "30.2.7")
    with open(path, "rb") as f:
        uploaded = upload_session(controller).post("image", files={"file": ("controller.pkg", f, "application/octet-stream")})
    assert uploaded.status_code == 201, uploaded.text
    # In a cluster the image is copied to every controller first; until then the image-state
    # check (14) is an error, as it should be. Wait for the copies, as an operator would.
    import time
    deadline = time.time() + 60
    while time.time() < deadline:
        image = api.get_object_by_name("image", tag)
        states = [n.get("state") for n in image.get("node_states", [])]
        if states and all(s == "IMAGE_FSM_COMPLETED" for s in states):
            break
        time.sleep(0.2)
    assert states and all(s == "IMAGE_FSM_COMPLETED" for s in states), image
    preview = api.post("upgrade/preview", data={"image_ref": "/api/image?name=" + tag, "system": True})
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["status_code"] == "SYSERR_UPGRADE_OPS_PREVIEW_RESPONSE"
    assert len(body["checks"]) == 22
    assert body["checks"][0]["description"] == "Check Controller Cluster readiness for upgrade operations."
    # Without skip_warnings a warning (no backup yet) stops it, and the status says so.
    refused = api.post("upgrade", data={"image_ref": "/api/image?name=" + tag, "system": True})
    assert refused.status_code == 400, refused.text
    nodes = api.get("upgradestatusinfo").json()["results"]
    controller_node = [n for n in nodes if n["node_type"] == "NODE_CONTROLLER_CLUSTER"][0]
    assert controller_node["state"]["state"] == "UPGRADE_PRE_CHECK_WARNING"
    assert controller_node["version"] == "30.2.1-9001"
    assert api.get("upgradestatussummary").json()["count"] == len(nodes)
    assert api.delete_by_name("image", tag).status_code == 204
