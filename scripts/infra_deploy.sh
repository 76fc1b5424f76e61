#!/usr/bin/env bash
# `make infra-deploy`: create or update the CloudFormation stack of infra/housing-mlops.yml with the aws CLI
# (v1 or v2), then print the stack's outputs: the names the workflows need (docs/aws-resources.md).
#
# dispatch_lambda.py is larger than an inline ZipFile may be (4 KB), so it is zipped and uploaded first, to
# s3://$CODE_BUCKET/dispatch_lambda/<content hash>.zip: a new key per version is what makes CloudFormation update
# the function's code.
#
# Settings (environment):
#   GITHUB_OWNER, GITHUB_REPO   the repository the Lambda dispatches retrain.yml in, and the only one whose
#                               workflows (on branch GITHUB_BRANCH=main) may assume the retrain and deploy roles:
#                               retrain.yml the one, ci-cd.yml the other (docs/security.md: set the repository's
#                               OIDC subject template to include job_workflow_ref once)
#   SERVING_IMAGE               Docker Hub repository of the serving image, e.g. acme/housing-serve
#   SERVING_TRACKING_URI        the MLflow server (http:// or https://) the serving host reads the registry from
#                               (not MLFLOW_TRACKING_URI: the Makefile sets that to the local sqlite store)
#   VPC_ID, SUBNET_ID           where the serving host runs (a public subnet)
#   MODEL_VERIFY_KEYS           the public keys the serving host trusts (docs/security.md): PEM files or one-line
#                               base64, comma-separated; the Makefile's default is the local promotion key's public half
#   STACK_NAME=housing-mlops
#   CODE_BUCKET                 default <stack>-code-<account>-<region>, created when missing
#   EXTRA_PARAMETERS            more Key=Value template parameters, e.g. "HttpIngressCidr=10.0.0.0/16" or
#                               "AdminIngressCidr=10.0.0.0/16" (the private network of the Prometheus scraping AdminPort)
#   AWS_REGION (or AWS_DEFAULT_REGION), credentials, AWS_ENDPOINT_URL: as the aws CLI reads them
set -euo pipefail
cd "$(dirname "$0")/.."

STACK_NAME=${STACK_NAME:-housing-mlops}
GITHUB_BRANCH=${GITHUB_BRANCH:-main}
TEMPLATE=infra/housing-mlops.yml

missing=() parameters=()
for pair in GitHubOwner=GITHUB_OWNER GitHubRepo=GITHUB_REPO GitHubRef=GITHUB_BRANCH ServingImage=SERVING_IMAGE \
  MlflowTrackingUri=SERVING_TRACKING_URI VpcId=VPC_ID SubnetId=SUBNET_ID ModelVerifyKeys=MODEL_VERIFY_KEYS; do
  variable=${pair#*=}
  [[ -n ${!variable:-} ]] || missing+=("$variable")
  parameters+=("${pair%=*}=${!variable:-}")
done
if [[ -z ${AWS_REGION:-${AWS_DEFAULT_REGION:-}} ]]; then missing+=(AWS_REGION); fi
if ((${#missing[@]})); then
  echo "infra-deploy: set ${missing[*]} (docs/aws-resources.md)" >&2
  exit 2
fi
if [[ ! $SERVING_TRACKING_URI =~ ^https?:// ]]; then
  echo "infra-deploy: SERVING_TRACKING_URI must be an MLflow server's http(s):// URL, not $SERVING_TRACKING_URI" >&2
  exit 2
fi
# The stack takes the keys on one line: a PEM file's body without its armour, as `python -m scripts.sign public-key`.
one_line=()
IFS=, read -ra keys <<<"$MODEL_VERIFY_KEYS"
for key in "${keys[@]}"; do
  if [[ -f $key ]]; then one_line+=("$(grep -v -- '-----' "$key" | tr -d '\n')"); else one_line+=("$key"); fi
done
parameters=("${parameters[@]/#ModelVerifyKeys=*/ModelVerifyKeys=$(IFS=,; echo "${one_line[*]}")}")
export AWS_DEFAULT_REGION=${AWS_REGION:-$AWS_DEFAULT_REGION}
command -v aws >/dev/null || { echo "infra-deploy: needs the aws CLI (https://aws.amazon.com/cli/)" >&2; exit 2; }

account=$(aws sts get-caller-identity --query Account --output text)
code_bucket=${CODE_BUCKET:-$(tr '[:upper:]' '[:lower:]' <<<"$STACK_NAME")-code-$account-$AWS_DEFAULT_REGION}
code_key=dispatch_lambda/$(sha256sum dispatch_lambda.py | cut -c1-16).zip
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m zipfile -c "$work/dispatch_lambda.zip" dispatch_lambda.py
aws s3api head-bucket --bucket "$code_bucket" >/dev/null 2>&1 || aws s3 mb "s3://$code_bucket"
aws s3 cp --quiet "$work/dispatch_lambda.zip" "s3://$code_bucket/$code_key"

read -ra extra <<<"${EXTRA_PARAMETERS:-}"
aws cloudformation deploy --stack-name "$STACK_NAME" --template-file "$TEMPLATE" --capabilities CAPABILITY_IAM \
  --no-fail-on-empty-changeset --parameter-overrides \
  "${parameters[@]}" "LambdaCodeBucket=$code_bucket" "LambdaCodeKey=$code_key" "${extra[@]}"
aws cloudformation describe-stacks --stack-name "$STACK_NAME" \
  --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output table
