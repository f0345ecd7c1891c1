"""Drives a running Updraft with Huawei's official IoTDA application SDK (huaweicloudsdkiotda) through
the calls a switching application uses beyond the basic upgrade: ShowApplications, a need_confirm task
on many devices paged to the end by marker, ConfirmBatchTask, a large group paged by marker, and a
routing rule with an HTTP forwarding action. Run by server/tests/it/sdk.rs; prints one JSON line.

Environment: UPDRAFT_ENDPOINT, UPDRAFT_AK, UPDRAFT_SK, UPDRAFT_PROJECT, UPDRAFT_CA, UPDRAFT_PACKAGE,
UPDRAFT_TASK_DEVICES (a file with one device id per line), UPDRAFT_GROUP, UPDRAFT_HOOK_URL.
"""

import json
import os

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkiotda.v5 import (
    AddActionReq,
    AddRuleReq,
    BatchTargets,
    ChannelDetail,
    ConfirmBatchTaskRequest,
    CreateBatchTask,
    CreateBatchTaskRequest,
    CreateRoutingRuleRequest,
    CreateRuleActionRequest,
    HttpForwarding,
    IoTDAClient,
    ListRoutingRulesRequest,
    ListRuleActionsRequest,
    RoutingRuleSubject,
    ShowApplicationsRequest,
    ShowBatchTaskRequest,
    ShowDevicesInGroupRequest,
    UpdateRoutingRuleRequest,
    UpdateRuleReq,
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
with open(env["UPDRAFT_TASK_DEVICES"]) as f:
    devices = [line.strip() for line in f if line.strip()]
out = {}

apps = client.show_applications(ShowApplicationsRequest()).applications
out["apps"] = len(apps)
app_id = apps[0].app_id
out["default_app"] = apps[0].default_app

task = client.create_batch_task(
    CreateBatchTaskRequest(
        body=CreateBatchTask(
            app_id=app_id,
            task_name="sdk_confirm",
            task_type="softwareUpgrade",
            targets=devices,
            need_confirm=True,
            task_ext_info={"wave": "canary"},
            document={"package_ids": [env["UPDRAFT_PACKAGE"]]},
        )
    )
)
out["need_confirm"] = task.need_confirm


def page_task(status=None):
    """Every device of the task, paged by marker, 50 at a time."""
    seen, marker, counts = [], None, set()
    while True:
        page = client.show_batch_task(
            ShowBatchTaskRequest(
                task_id=task.task_id, limit=50, marker=marker, task_detail_status=status
            )
        )
        seen.extend((d.target, d.status) for d in page.task_details)
        counts.add(page.page.count)
        if len(page.task_details) < 50:
            return seen, counts
        marker = page.page.marker


details, counts = page_task()
out["task_devices"] = len({t for t, _ in details})
out["task_pages_count"] = sorted(counts)
out["all_waiting"] = all(s == "Waitting" for _, s in details)

confirmed = client.confirm_batch_task(
    ConfirmBatchTaskRequest(task_id=task.task_id, body=BatchTargets(targets=devices[:3]))
)
out["confirmed"] = [t.status for t in confirmed.targets]

members, marker, group_counts = [], None, set()
while True:
    page = client.show_devices_in_group(
        ShowDevicesInGroupRequest(group_id=env["UPDRAFT_GROUP"], limit=50, marker=marker)
    )
    members.extend(d.device_id for d in page.devices)
    group_counts.add(page.page.count)
    if len(page.devices) < 50:
        break
    marker = page.page.marker
out["group_devices"] = len(set(members))
out["group_pages_count"] = sorted(group_counts)

rule = client.create_routing_rule(
    CreateRoutingRuleRequest(
        body=AddRuleReq(
            rule_name="batchtask_to_billing",
            description="task changes",
            subject=RoutingRuleSubject(resource="batchtask", event="update"),
            app_type="GLOBAL",
        )
    )
)
out["rule_active_at_creation"] = rule.active
rule = client.update_routing_rule(
    UpdateRoutingRuleRequest(rule_id=rule.rule_id, body=UpdateRuleReq(active=True))
)
out["rule_active"] = rule.active
action = client.create_rule_action(
    CreateRuleActionRequest(
        body=AddActionReq(
            rule_id=rule.rule_id,
            channel="HTTP_FORWARDING",
            channel_detail=ChannelDetail(
                http_forwarding=HttpForwarding(url=env["UPDRAFT_HOOK_URL"], token="sdk-chosen-token")
            ),
        )
    )
)
out["action_rule"] = action.rule_id == rule.rule_id
out["action_url"] = action.channel_detail.http_forwarding.url
rules = client.list_routing_rules(ListRoutingRulesRequest(resource="batchtask"))
out["rules"] = [r.rule_name for r in rules.rules]
actions = client.list_rule_actions(ListRuleActionsRequest(rule_id=rule.rule_id))
out["actions"] = len(actions.actions)
print(json.dumps(out))
