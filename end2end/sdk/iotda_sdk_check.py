"""Drives a running Updraft with Huawei's official IoTDA application SDK (huaweicloudsdkiotda), changing
only the endpoint: register a package from a bucket location, run a batch task on two devices until it
succeeds, then check stop and delete. Run by server/tests/it/sdk.rs; prints one JSON line of results.

Environment: UPDRAFT_ENDPOINT, UPDRAFT_AK, UPDRAFT_SK, UPDRAFT_PROJECT, UPDRAFT_CA, UPDRAFT_BUCKET,
UPDRAFT_OBJECT_KEY, UPDRAFT_PRODUCT, UPDRAFT_DEVICES (comma-separated), UPDRAFT_IDLE_DEVICE.
"""

import json
import os
import sys
import time

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions import exceptions
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkiotda.v5 import (
    CreateBatchTask,
    CreateBatchTaskRequest,
    CreateOtaPackage,
    CreateOtaPackageRequest,
    DeleteBatchTaskRequest,
    FileLocation,
    ObsLocation,
    IoTDAClient,
    ShowBatchTaskRequest,
    ShowOtaPackageRequest,
    StopBatchTaskRequest,
    TaskPolicy,
)

env = os.environ
credentials = BasicCredentials(env["UPDRAFT_AK"], env["UPDRAFT_SK"], env["UPDRAFT_PROJECT"])
config = HttpConfig.get_default_config()
config.ssl_ca_cert = env["UPDRAFT_CA"]
client = (
    IoTDAClient.new_builder()
    .with_credentials(credentials)
    .with_http_config(config)
    .with_endpoints([env["UPDRAFT_ENDPOINT"]])
    .build()
)
devices = env["UPDRAFT_DEVICES"].split(",")
out = {}

package = client.create_ota_package(
    CreateOtaPackageRequest(
        body=CreateOtaPackage(
            app_id=None,
            package_type="softwarePackage",
            product_id=env["UPDRAFT_PRODUCT"],
            version="2.0",
            support_source_versions=["1.0"],
            description="from the SDK",
            file_location=FileLocation(
                obs_location=ObsLocation(
                    region_name="local",
                    bucket_name=env["UPDRAFT_BUCKET"],
                    object_key=env["UPDRAFT_OBJECT_KEY"],
                )
            ),
        )
    )
)
out["package_id"] = package.package_id
shown = client.show_ota_package(ShowOtaPackageRequest(package_id=package.package_id))
out["package_version"] = shown.version

task = client.create_batch_task(
    CreateBatchTaskRequest(
        body=CreateBatchTask(
            task_name="sdk_upgrade",
            task_type="softwareUpgrade",
            targets=devices,
            document={"package_ids": [package.package_id]},
            task_policy=TaskPolicy(retry_count=1, retry_interval=5),
        )
    )
)
out["task_id"] = task.task_id
deadline = time.time() + 60
status = None
while time.time() < deadline:
    detail = client.show_batch_task(ShowBatchTaskRequest(task_id=task.task_id))
    status = detail.batchtask.status
    if status in ("Success", "Fail", "PartialSuccess", "Stopped"):
        break
    time.sleep(0.3)
out["status"] = status
out["success"] = detail.batchtask.task_progress.success
out["details"] = sorted(d.target for d in detail.task_details or [])

# A task for a device that never connects: deleting it while it runs is refused, stopping it works,
# then it can be deleted.
idle = client.create_batch_task(
    CreateBatchTaskRequest(
        body=CreateBatchTask(
            task_name="sdk_idle",
            task_type="softwareUpgrade",
            targets=[env["UPDRAFT_IDLE_DEVICE"]],
            document={"package_ids": [package.package_id]},
        )
    )
)
try:
    client.delete_batch_task(DeleteBatchTaskRequest(task_id=idle.task_id))
    out["delete_running"] = "allowed"
except exceptions.ClientRequestException as e:
    out["delete_running"] = {"status": e.status_code, "code": e.error_code, "request_id": bool(e.request_id)}
client.stop_batch_task(StopBatchTaskRequest(task_id=idle.task_id))
out["stopped_status"] = client.show_batch_task(ShowBatchTaskRequest(task_id=idle.task_id)).batchtask.status
client.delete_batch_task(DeleteBatchTaskRequest(task_id=idle.task_id))
try:
    client.show_batch_task(ShowBatchTaskRequest(task_id=idle.task_id))
    out["after_delete"] = "still there"
except exceptions.ClientRequestException as e:
    out["after_delete"] = e.status_code

print(json.dumps(out))
sys.exit(0)
