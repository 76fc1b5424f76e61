"""infra/housing-mlops.yml, deployed by the real scripts/infra_deploy.sh (the aws CLI) into moto's CloudFormation.

moto 5.2.5 creates most of the stack, but not everything: its CloudFormation has no AWS::SecretsManager::Secret or
AWS::IAM::OIDCProvider (references to them come out empty), ignores a bucket's VersioningConfiguration and
NotificationConfiguration and a role's ManagedPolicyArns, and computes outputs only for stacks made by CreateStack
(`aws cloudformation deploy` uses change sets). What moto cannot create, test_template_* checks in the template.
"""

from __future__ import annotations

import ast
import base64
import io
import ipaddress
import json
import re
import subprocess
import zipfile
from typing import Any

import boto3
import pytest
from cfnlint.decode import cfn_yaml

from tests.conftest import ROOT, clean_environment
from tests.registry import promotion_keys

# Expected, and described above: moto warns about each resource type its CloudFormation does not implement.
pytestmark = pytest.mark.filterwarnings("ignore:Tried to parse AWS.* but it's not supported:UserWarning")

TEMPLATE = ROOT / "infra" / "housing-mlops.yml"
REGION, ACCOUNT, STACK = "us-east-1", "123456789012", "housing-mlops"
SETTINGS = {
    "GITHUB_OWNER": "acme",
    "GITHUB_REPO": "housing-mlops",
    "SERVING_IMAGE": "acme/housing-serve",
    "SERVING_TRACKING_URI": "http://mlflow.internal:5000",
    "MODEL_VERIFY_KEYS": promotion_keys()[1],  # a PEM file: infra_deploy.sh puts it on one line
}


@pytest.fixture(scope="module")
def aws(moto_endpoint: str) -> Any:
    """aws("s3") -> a boto3 client of the moto server."""
    return lambda service: boto3.client(
        service,
        endpoint_url=moto_endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def network(aws) -> dict[str, str]:
    vpc = aws("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = aws("ec2").describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    return {"VPC_ID": vpc, "SUBNET_ID": subnet}


def infra_deploy(moto_endpoint: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in clean_environment().items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=moto_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        **settings,
    )
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "infra_deploy.sh")], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def stack(moto_endpoint: str, aws, network: dict[str, str]) -> dict[str, str]:
    """`make infra-deploy` against moto; the stack's resources by logical id."""
    result = infra_deploy(moto_endpoint, **SETTINGS, **network)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Successfully created/updated stack - {STACK}" in result.stdout
    summaries = aws("cloudformation").list_stack_resources(StackName=STACK)["StackResourceSummaries"]
    return {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in summaries if r["LogicalResourceId"]}


def template() -> dict[str, Any]:
    return cfn_yaml.loads(TEMPLATE.read_text())


def statements(aws, role: str, policy: str) -> list[dict[str, Any]]:
    document = aws("iam").get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
    if isinstance(document, str):  # moto returns the document of a CloudFormation role as a Python literal
        document = ast.literal_eval(document)
    return document["Statement"]


@pytest.mark.integration
def test_infra_deploy_needs_its_settings(moto_endpoint: str, network: dict[str, str]):
    result = infra_deploy(moto_endpoint, GITHUB_OWNER="acme")
    assert result.returncode == 2
    assert "set GITHUB_REPO SERVING_IMAGE SERVING_TRACKING_URI VPC_ID SUBNET_ID MODEL_VERIFY_KEYS" in result.stderr
    result = infra_deploy(moto_endpoint, **{**SETTINGS, **network, "SERVING_TRACKING_URI": "sqlite:///mlflow.db"})
    assert result.returncode == 2
    assert "SERVING_TRACKING_URI must be an MLflow server's http(s):// URL" in result.stderr


@pytest.mark.integration
def test_infra_deploy_uploads_the_lambda_code_and_creates_the_stack(aws, stack: dict[str, str]):
    assert aws("cloudformation").describe_stacks(StackName=STACK)["Stacks"][0]["StackStatus"] == "CREATE_COMPLETE"
    assert {
        "DataBucket",
        "DvcBucket",
        "MlflowArtifactBucket",
        "DispatchLogGroup",
        "DispatchRole",
        "DispatchFunction",
        "NewDataRule",
        "NewDataRulePermission",
        "ServingSecurityGroup",
        "ServingRole",
        "ServingInstanceProfile",
        "ServingInstance",
        "RetrainRole",
        "DeployRole",
        "DispatchDeadLetterQueue",
        "AccessLogBucket",
    } <= set(stack)

    code_bucket = f"{STACK}-code-{ACCOUNT}-{REGION}"
    keys = [o["Key"] for o in aws("s3").list_objects_v2(Bucket=code_bucket)["Contents"]]
    assert len(keys) == 1 and re.fullmatch(r"dispatch_lambda/[0-9a-f]{16}\.zip", keys[0])
    archive = zipfile.ZipFile(io.BytesIO(aws("s3").get_object(Bucket=code_bucket, Key=keys[0])["Body"].read()))
    assert archive.namelist() == ["dispatch_lambda.py"]
    assert archive.read("dispatch_lambda.py") == (ROOT / "dispatch_lambda.py").read_bytes()

    function = aws("lambda").get_function_configuration(FunctionName=stack["DispatchFunction"])
    assert (function["Runtime"], function["Handler"], function["Timeout"]) == (
        "python3.12",
        "dispatch_lambda.handler",
        60,
    )
    assert function["Role"].endswith(f":role/{stack['DispatchRole']}")
    assert (
        function["Environment"]["Variables"].items()
        >= {
            "GITHUB_OWNER": "acme",
            "GITHUB_REPO": "housing-mlops",
            "GITHUB_WORKFLOW": "retrain.yml",
            "GITHUB_REF": "main",
            "S3_KEY_PREFIX": "data/",
            "S3_KEY_SUFFIX": "housing.csv",
        }.items()
    )
    dead_letters = aws("sqs").get_queue_attributes(QueueUrl=stack["DispatchDeadLetterQueue"], AttributeNames=["All"])
    assert dead_letters["Attributes"]["MessageRetentionPeriod"] == "1209600"


@pytest.mark.integration
def test_new_data_rule_sends_new_housing_csvs_and_nothing_else_to_the_lambda(aws, stack: dict[str, str]):
    events = aws("events")
    rule = events.describe_rule(Name=stack["NewDataRule"])
    assert json.loads(rule["EventPattern"]) == {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {"bucket": {"name": [stack["DataBucket"]]}, "object": {"key": [{"wildcard": "data/*housing.csv"}]}},
    }
    function_arn = aws("lambda").get_function_configuration(FunctionName=stack["DispatchFunction"])["FunctionArn"]
    assert [t["Arn"] for t in events.list_targets_by_rule(Rule=stack["NewDataRule"])["Targets"]] == [function_arn]
    [permission] = json.loads(aws("lambda").get_policy(FunctionName=stack["DispatchFunction"])["Policy"])["Statement"]
    assert permission["Principal"] == {"Service": "events.amazonaws.com"}
    assert permission["Action"] == "lambda:InvokeFunction"
    assert permission["Condition"]["ArnLike"]["AWS:SourceArn"] == rule["Arn"]

    # The same pattern, applied by moto's EventBridge on a bus of its own and routed to a queue (moto delivers to
    # no Lambda): which keys would start a retrain.
    queue = aws("sqs").create_queue(QueueName="new-data-probe")["QueueUrl"]
    queue_arn = aws("sqs").get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events.create_event_bus(Name="probe")
    events.put_rule(Name="new-data-probe", EventBusName="probe", EventPattern=rule["EventPattern"])
    events.put_targets(Rule="new-data-probe", EventBusName="probe", Targets=[{"Id": "queue", "Arn": queue_arn}])
    keys = [
        "data/housing.csv",
        "data/2026/11/housing.csv",
        "files/md5/3f/9a1c",
        "data/housing.csv.part",
        "raw/housing.csv",
    ]
    events.put_events(
        Entries=[
            {
                "EventBusName": "probe",
                "Source": "aws.s3",
                "DetailType": "Object Created",
                "Detail": json.dumps({"bucket": {"name": stack["DataBucket"]}, "object": {"key": key}}),
            }
            for key in keys
        ]
    )
    messages = aws("sqs").receive_message(QueueUrl=queue, MaxNumberOfMessages=10)["Messages"]
    assert sorted(json.loads(m["Body"])["detail"]["object"]["key"] for m in messages) == [
        "data/2026/11/housing.csv",
        "data/housing.csv",
    ]


@pytest.mark.integration
def test_roles_grant_only_what_each_part_needs(aws, stack: dict[str, str]):
    log_group = aws("logs").describe_log_groups(logGroupNamePrefix=f"/aws/lambda/{STACK}-dispatch")["logGroups"][0]
    dispatch = statements(aws, stack["DispatchRole"], "dispatch")
    assert [(s["Sid"], s["Action"]) for s in dispatch] == [
        ("ReadGitHubToken", "secretsmanager:GetSecretValue"),
        ("WriteOwnLogs", ["logs:CreateLogStream", "logs:PutLogEvents"]),
        ("DeadLetters", "sqs:SendMessage"),
    ]
    assert dispatch[1]["Resource"] == log_group["logGroupArn"]
    queue = aws("sqs").get_queue_attributes(QueueUrl=stack["DispatchDeadLetterQueue"], AttributeNames=["QueueArn"])
    assert dispatch[2]["Resource"] == queue["Attributes"]["QueueArn"]

    serve = {s["Sid"]: s for s in statements(aws, stack["ServingRole"], "serve")}
    artifacts = f"arn:aws:s3:::{stack['MlflowArtifactBucket']}"
    assert serve["ReadModelArtifacts"]["Action"] == "s3:GetObject"
    assert serve["ReadModelArtifacts"]["Resource"] == f"{artifacts}/*"
    assert (serve["ListModelArtifacts"]["Action"], serve["ListModelArtifacts"]["Resource"]) == (
        "s3:ListBucket",
        artifacts,
    )
    ship = serve["ShipPredictionLog"]
    assert (ship["Action"], ship["Resource"]) == ("s3:PutObject", f"arn:aws:s3:::{stack['DataBucket']}/predictions/*")
    assert set(serve) == {"ReadReloadToken", "ReadModelArtifacts", "ListModelArtifacts", "ShipPredictionLog"}


def actions(statement: dict[str, Any]) -> list[str]:
    return statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]


def resources(statement: dict[str, Any]) -> list[str]:
    return statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]


@pytest.mark.integration
@pytest.mark.parametrize(("role", "workflow"), [("RetrainRole", "retrain.yml"), ("DeployRole", "ci-cd.yml"),
                                              ("RealizedRole", "realized.yml")])
def test_each_github_role_is_trusted_only_by_its_own_workflow_on_main(aws, stack: dict[str, str], role, workflow):
    trust = aws("iam").get_role(RoleName=stack[role])["Role"]["AssumeRolePolicyDocument"]
    [statement] = trust["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert statement["Condition"] == {
        "StringEquals": {
            "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
            "token.actions.githubusercontent.com:sub": "repo:acme/housing-mlops:ref:refs/heads/main:job_workflow_ref:"
            f"acme/housing-mlops/.github/workflows/{workflow}@refs/heads/main",
        }
    }


@pytest.mark.integration
def test_retrain_role_reaches_the_buckets_and_no_host(aws, stack: dict[str, str]):
    retrain = {s["Sid"]: s for s in statements(aws, stack["RetrainRole"], "retrain")}
    assert set(retrain) == {"ReadNewData", "ReadWriteDvcAndMlflowObjects", "ListBuckets"}
    granted = {action for statement in retrain.values() for action in actions(statement)}
    assert granted == {"s3:GetObject", "s3:GetObjectVersion", "s3:PutObject", "s3:ListBucket"}
    buckets = {f"arn:aws:s3:::{stack[name]}" for name in ("DataBucket", "DvcBucket", "MlflowArtifactBucket")}
    for statement in retrain.values():
        assert {resource.removesuffix("/*") for resource in resources(statement)} <= buckets, statement
    assert resources(retrain["ReadNewData"]) == [f"arn:aws:s3:::{stack['DataBucket']}/*"]  # the data is read-only


@pytest.mark.integration
def test_realized_role_reads_only_the_labels_and_the_prediction_log_and_keeps_its_last_report(aws, stack):
    realized = {s["Sid"]: s for s in statements(aws, stack["RealizedRole"], "realized")}
    data = f"arn:aws:s3:::{stack['DataBucket']}"
    assert realized["ReadLabelsAndPredictionLog"]["Action"] == "s3:GetObject"
    assert resources(realized["ReadLabelsAndPredictionLog"]) == [f"{data}/labels/*", f"{data}/predictions/*"]
    listing = realized["ListLabelsAndPredictionLog"]
    assert (listing["Action"], listing["Resource"]) == ("s3:ListBucket", data)
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["labels/*", "predictions/*"]}}
    assert (actions(realized["KeepLastReport"]), resources(realized["KeepLastReport"])) == (
        ["s3:GetObject", "s3:PutObject"], [f"{data}/realized/*"])
    assert set(realized) == {"ReadLabelsAndPredictionLog", "ListLabelsAndPredictionLog", "KeepLastReport"}


@pytest.mark.integration
def test_deploy_role_may_only_run_commands_on_the_tagged_serving_host(aws, stack: dict[str, str]):
    deploy = {s["Sid"]: s for s in statements(aws, stack["DeployRole"], "deploy")}
    assert set(deploy) == {"RunCommandOnTheServingHost", "WithTheShellScriptDocument", "FollowTheDeploy"}
    host = deploy["RunCommandOnTheServingHost"]
    assert (host["Action"], host["Resource"]) == (
        "ssm:SendCommand",
        f"arn:aws:ec2:{REGION}:{ACCOUNT}:instance/{stack['ServingInstance']}",
    )
    assert host["Condition"] == {"StringEquals": {"ssm:resourceTag/housing-mlops-role": "serving"}}
    [reservation] = aws("ec2").describe_instances(InstanceIds=[stack["ServingInstance"]])["Reservations"]
    assert {"Key": "housing-mlops-role", "Value": "serving"} in reservation["Instances"][0]["Tags"]
    assert deploy["WithTheShellScriptDocument"]["Resource"] == f"arn:aws:ssm:{REGION}::document/AWS-RunShellScript"
    assert not any(a.startswith("s3:") for s in deploy.values() for a in actions(s))


def test_no_statement_grants_a_wildcard_resource_except_the_ssm_reads_that_take_none():
    """Checked in the template: moto drops a statement's Resource when it refers to a secret (it has none)."""
    wildcards = []
    for name, resource in template()["Resources"].items():
        if resource["Type"] != "AWS::IAM::Role":
            continue
        for policy in resource["Properties"]["Policies"]:
            for statement in policy["PolicyDocument"]["Statement"]:
                if "*" in resources(statement):
                    wildcards.append((name, statement["Sid"], sorted(actions(statement))))
    assert wildcards == [("DeployRole", "FollowTheDeploy", ["ssm:GetCommandInvocation", "ssm:ListCommandInvocations"])]


@pytest.mark.integration
def test_serving_host_takes_http_on_port_80_and_nothing_else(aws, stack: dict[str, str], network: dict[str, str]):
    [group] = aws("ec2").describe_security_groups(GroupIds=[stack["ServingSecurityGroup"]])["SecurityGroups"]
    assert group["VpcId"] == network["VPC_ID"]
    assert [
        (p["IpProtocol"], p["FromPort"], p["ToPort"], [r["CidrIp"] for r in p["IpRanges"]])
        for p in group["IpPermissions"]
    ] == [("tcp", 80, 80, ["0.0.0.0/0"])]

    [reservation] = aws("ec2").describe_instances(InstanceIds=[stack["ServingInstance"]])["Reservations"]
    instance = reservation["Instances"][0]
    assert instance["SubnetId"] == network["SUBNET_ID"]
    assert instance["IamInstanceProfile"]["Arn"].endswith(f":instance-profile/{stack['ServingInstanceProfile']}")
    user_data = aws("ec2").describe_instance_attribute(InstanceId=stack["ServingInstance"], Attribute="userData")
    script = base64.b64decode(user_data["UserData"]["Value"]).decode()
    assert "MLFLOW_TRACKING_URI=http://mlflow.internal:5000\n" in script
    assert "IMAGE=acme/housing-serve\n" in script
    assert f"PREDICTION_LOG_S3=s3://{stack['DataBucket']}/predictions/{STACK}-serve\n" in script
    assert "git clone --branch main https://github.com/acme/housing-mlops.git /opt/housing-mlops" in script


@pytest.mark.integration
def test_outputs_name_every_repository_variable_the_workflows_read(aws, stack: dict[str, str], network: dict[str, str]):
    declared = template()["Outputs"]
    provided = {m for o in declared.values() for m in re.findall(r"Repository variable (\w+)", o["Description"])}
    workflows = "".join(p.read_text() for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    read = set(re.findall(r"vars\.(\w+)", workflows))
    # The MLflow server is not part of the stack, nor is the promotion key (docs/security.md), nor a Prometheus or
    # a Pushgateway.
    assert read - provided == {"MLFLOW_TRACKING_URI", "MODEL_NAME", "MODEL_VERIFY_KEYS", "PROMETHEUS_URL",
                               "PUSHGATEWAY_URL"}

    parameters = {
        "GitHubOwner": "acme",
        "GitHubRepo": "housing-mlops",
        "ServingImage": "acme/housing-serve",
        "MlflowTrackingUri": "http://mlflow.internal:5000",
        "ModelVerifyKeys": "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
        "VpcId": network["VPC_ID"],
        "SubnetId": network["SUBNET_ID"],
        "LambdaCodeBucket": f"{STACK}-code-{ACCOUNT}-{REGION}",
        "LambdaCodeKey": "dispatch_lambda/none.zip",
    }
    aws("cloudformation").create_stack(  # CreateStack: the path on which moto computes outputs
        StackName="outputs",
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
    )
    outputs = {
        o["OutputKey"]: o["OutputValue"]
        for o in aws("cloudformation").describe_stacks(StackName="outputs")["Stacks"][0]["Outputs"]
    }
    assert set(outputs) == set(declared) - {"GitHubTokenSecretArn", "ReloadTokenSecretArn"}  # no secrets in moto
    aws("s3").head_bucket(Bucket=outputs["DvcBucketName"])
    aws("ec2").describe_instances(InstanceIds=[outputs["ServingInstanceId"]])
    for output in ("RetrainRoleArn", "DeployRoleArn", "RealizedRoleArn"):
        assert aws("iam").get_role(RoleName=outputs[output].split("/")[-1])["Role"]["Arn"] == outputs[output]
    assert outputs["PredictUrl"].startswith("http://") and outputs["AwsRegion"] == REGION
    admin = re.fullmatch(r"http://([\d.]+):9100", outputs["AdminUrl"])  # the private address and AdminPort
    assert admin is not None and ipaddress.ip_address(admin.group(1)).is_private, outputs["AdminUrl"]


def test_template_data_bucket_tells_eventbridge():
    data = template()["Resources"]["DataBucket"]["Properties"]
    assert data["NotificationConfiguration"] == {"EventBridgeConfiguration": {"EventBridgeEnabled": True}}


@pytest.mark.parametrize("bucket", ["DataBucket", "DvcBucket", "MlflowArtifactBucket", "AccessLogBucket"])
def test_template_buckets_keep_old_versions_for_a_while_refuse_public_access_and_plain_http(bucket):
    resources = template()["Resources"]
    properties = resources[bucket]["Properties"]
    assert properties["VersioningConfiguration"] == {"Status": "Enabled"}
    [rule] = properties["LifecycleConfiguration"]["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": {"Ref": "NoncurrentVersionDays"}}
    assert properties["PublicAccessBlockConfiguration"] == dict.fromkeys(
        ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"), True
    )
    [policy] = [
        r["Properties"]
        for r in resources.values()
        if r["Type"] == "AWS::S3::BucketPolicy" and r["Properties"]["Bucket"] == {"Ref": bucket}
    ]
    deny = policy["PolicyDocument"]["Statement"][0]
    assert (deny["Effect"], deny["Principal"], deny["Action"]) == ("Deny", "*", "s3:*")
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": False}}
    assert deny["Resource"] == [{"Fn::GetAtt": [bucket, "Arn"]}, {"Fn::Sub": f"${{{bucket}.Arn}}/*"}]
    if bucket != "AccessLogBucket":
        assert properties["LoggingConfiguration"]["DestinationBucketName"] == {"Ref": "AccessLogBucket"}


def test_template_failed_dispatches_go_to_the_dead_letter_queue_and_are_not_retried():
    resources = template()["Resources"]
    function = resources["DispatchFunction"]["Properties"]
    queue = {"Fn::GetAtt": ["DispatchDeadLetterQueue", "Arn"]}
    assert function["DeadLetterConfig"] == {"TargetArn": queue}
    assert 0 < function["ReservedConcurrentExecutions"] <= 5
    invoke = resources["DispatchInvokeConfig"]["Properties"]
    assert (invoke["FunctionName"], invoke["MaximumRetryAttempts"]) == ({"Ref": "DispatchFunction"}, 0)
    [target] = resources["NewDataRule"]["Properties"]["Targets"]
    assert target["DeadLetterConfig"] == {"Arn": queue}
    [allow] = resources["DispatchDeadLetterQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
    assert allow["Principal"] == {"Service": "events.amazonaws.com"}
    assert allow["Condition"] == {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["NewDataRule", "Arn"]}}}


def test_template_admin_port_is_open_only_to_a_given_private_network():
    resources = template()["Resources"]
    [public] = resources["ServingSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    assert (public["FromPort"], public["ToPort"]) == (80, 80)
    admin = resources["AdminPortIngress"]
    assert admin["Condition"] == "AdminIngress"
    assert admin["Properties"]["CidrIp"] == {"Ref": "AdminIngressCidr"}
    assert admin["Properties"]["FromPort"] == {"Ref": "AdminPort"}
    pattern = re.compile(template()["Parameters"]["AdminIngressCidr"]["AllowedPattern"])
    assert pattern.fullmatch("") and pattern.fullmatch("10.0.0.0/16") and pattern.fullmatch("192.168.1.0/24")
    assert not pattern.fullmatch("0.0.0.0/0") and not pattern.fullmatch("8.8.8.0/24")
    user_data = resources["ServingInstance"]["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert user_data.count("ADMIN_PORT=${AdminPort}\n") == 2  # the app's settings and deploy.sh's


def test_template_secrets_are_generated_and_each_read_by_one_role():
    resources = template()["Resources"]
    for secret in ("GitHubTokenSecret", "ReloadTokenSecret"):
        assert set(resources[secret]["Properties"]) == {"Description", "GenerateSecretString"}
    assert not re.search(r"^\s*SecretString:", TEMPLATE.read_text(), re.MULTILINE)  # no secret in the template
    environment = resources["DispatchFunction"]["Properties"]["Environment"]["Variables"]
    assert environment["GITHUB_PAT_SECRET_ARN"] == {"Ref": "GitHubTokenSecret"}
    reads = {}
    for name, resource in resources.items():
        if resource["Type"] == "AWS::IAM::Role":
            for policy in resource["Properties"]["Policies"]:
                for statement in policy["PolicyDocument"]["Statement"]:
                    if statement["Action"] == "secretsmanager:GetSecretValue":
                        reads[name] = statement["Resource"]
    assert reads == {"DispatchRole": {"Ref": "GitHubTokenSecret"}, "ServingRole": {"Ref": "ReloadTokenSecret"}}
    user_data = resources["ServingInstance"]["Properties"]["UserData"]["Fn::Base64"]["Fn::Sub"]
    assert "RELOAD_TOKEN_SECRET_ARN=${ReloadTokenSecret}" in user_data
