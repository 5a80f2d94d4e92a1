//! k8s.io/api core/v1: Pod, Node, Namespace, ConfigMap, Secret, Service,
//! ServiceAccount, Binding.

use super::meta::{CONDITION, META};
use super::{Field, Kind, f, p, r};

pub(crate) const OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "namespace", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "fieldPath", Kind::Str),
];

pub(crate) const LOCAL_OBJECT_REFERENCE: &[Field] = &[f(1, "name", Kind::Str)];

/// `localObjectReference`, inline in JSON (ConfigMapKeySelector and friends).
const LOCAL_REF: Field = f(
    1,
    "localObjectReference",
    Kind::Inline(LOCAL_OBJECT_REFERENCE),
);

// ------------------------------------------------------------------ Pod

const KEY_TO_PATH: &[Field] = &[
    r(1, "key", Kind::Str),
    r(2, "path", Kind::Str),
    p(3, "mode", Kind::Int32),
];

const VOLUME_SOURCE: &[Field] = &[
    p(
        1,
        "hostPath",
        Kind::Msg(&[r(1, "path", Kind::Str), p(2, "type", Kind::Str)]),
    ),
    p(
        2,
        "emptyDir",
        Kind::Msg(&[f(1, "medium", Kind::Str), p(2, "sizeLimit", Kind::Quantity)]),
    ),
    p(
        6,
        "secret",
        Kind::Msg(&[
            f(1, "secretName", Kind::Str),
            f(2, "items", Kind::RepMsg(KEY_TO_PATH)),
            p(3, "defaultMode", Kind::Int32),
            p(4, "optional", Kind::Bool),
        ]),
    ),
    p(
        10,
        "persistentVolumeClaim",
        Kind::Msg(&[r(1, "claimName", Kind::Str), f(2, "readOnly", Kind::Bool)]),
    ),
    p(
        19,
        "configMap",
        Kind::Msg(&[
            LOCAL_REF,
            f(2, "items", Kind::RepMsg(KEY_TO_PATH)),
            p(3, "defaultMode", Kind::Int32),
            p(4, "optional", Kind::Bool),
        ]),
    ),
];

const VOLUME: &[Field] = &[
    r(1, "name", Kind::Str),
    f(2, "volumeSource", Kind::Inline(VOLUME_SOURCE)),
];

const CONTAINER_PORT: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "hostPort", Kind::Int32),
    r(3, "containerPort", Kind::Int32),
    f(4, "protocol", Kind::Str),
    f(5, "hostIP", Kind::Str),
];

/// ConfigMapKeySelector and SecretKeySelector.
const KEY_SELECTOR: &[Field] = &[
    LOCAL_REF,
    r(2, "key", Kind::Str),
    p(3, "optional", Kind::Bool),
];

const ENV_VAR_SOURCE: &[Field] = &[
    p(
        1,
        "fieldRef",
        Kind::Msg(&[f(1, "apiVersion", Kind::Str), r(2, "fieldPath", Kind::Str)]),
    ),
    p(3, "configMapKeyRef", Kind::Msg(KEY_SELECTOR)),
    p(4, "secretKeyRef", Kind::Msg(KEY_SELECTOR)),
];

const ENV_VAR: &[Field] = &[
    r(1, "name", Kind::Str),
    f(2, "value", Kind::Str),
    p(3, "valueFrom", Kind::Msg(ENV_VAR_SOURCE)),
];

/// ConfigMapEnvSource and SecretEnvSource.
const ENV_SOURCE: &[Field] = &[LOCAL_REF, p(2, "optional", Kind::Bool)];

const ENV_FROM_SOURCE: &[Field] = &[
    f(1, "prefix", Kind::Str),
    p(2, "configMapRef", Kind::Msg(ENV_SOURCE)),
    p(3, "secretRef", Kind::Msg(ENV_SOURCE)),
];

const RESOURCE_REQUIREMENTS: &[Field] = &[
    f(1, "limits", Kind::MapQuantity),
    f(2, "requests", Kind::MapQuantity),
];

const VOLUME_MOUNT: &[Field] = &[
    r(1, "name", Kind::Str),
    f(2, "readOnly", Kind::Bool),
    r(3, "mountPath", Kind::Str),
    f(4, "subPath", Kind::Str),
    p(5, "mountPropagation", Kind::Str),
    f(6, "subPathExpr", Kind::Str),
    p(7, "recursiveReadOnly", Kind::Str),
];

const PROBE_HANDLER: &[Field] = &[
    p(1, "exec", Kind::Msg(&[f(1, "command", Kind::RepStr)])),
    p(
        2,
        "httpGet",
        Kind::Msg(&[
            f(1, "path", Kind::Str),
            r(2, "port", Kind::IntOrString),
            f(3, "host", Kind::Str),
            f(4, "scheme", Kind::Str),
            f(
                5,
                "httpHeaders",
                Kind::RepMsg(&[r(1, "name", Kind::Str), r(2, "value", Kind::Str)]),
            ),
        ]),
    ),
    p(
        3,
        "tcpSocket",
        Kind::Msg(&[r(1, "port", Kind::IntOrString), f(2, "host", Kind::Str)]),
    ),
];

const PROBE: &[Field] = &[
    f(1, "handler", Kind::Inline(PROBE_HANDLER)),
    f(2, "initialDelaySeconds", Kind::Int32),
    f(3, "timeoutSeconds", Kind::Int32),
    f(4, "periodSeconds", Kind::Int32),
    f(5, "successThreshold", Kind::Int32),
    f(6, "failureThreshold", Kind::Int32),
    p(7, "terminationGracePeriodSeconds", Kind::Int64),
];

const SECURITY_CONTEXT: &[Field] = &[
    p(2, "privileged", Kind::Bool),
    p(4, "runAsUser", Kind::Int64),
    p(5, "runAsNonRoot", Kind::Bool),
    p(6, "readOnlyRootFilesystem", Kind::Bool),
    p(7, "allowPrivilegeEscalation", Kind::Bool),
    p(8, "runAsGroup", Kind::Int64),
];

const CONTAINER: &[Field] = &[
    r(1, "name", Kind::Str),
    f(2, "image", Kind::Str),
    f(3, "command", Kind::RepStr),
    f(4, "args", Kind::RepStr),
    f(5, "workingDir", Kind::Str),
    f(6, "ports", Kind::RepMsg(CONTAINER_PORT)),
    f(7, "env", Kind::RepMsg(ENV_VAR)),
    f(8, "resources", Kind::Msg(RESOURCE_REQUIREMENTS)),
    f(9, "volumeMounts", Kind::RepMsg(VOLUME_MOUNT)),
    p(10, "livenessProbe", Kind::Msg(PROBE)),
    p(11, "readinessProbe", Kind::Msg(PROBE)),
    f(13, "terminationMessagePath", Kind::Str),
    f(14, "imagePullPolicy", Kind::Str),
    p(15, "securityContext", Kind::Msg(SECURITY_CONTEXT)),
    f(16, "stdin", Kind::Bool),
    f(17, "stdinOnce", Kind::Bool),
    f(18, "tty", Kind::Bool),
    f(19, "envFrom", Kind::RepMsg(ENV_FROM_SOURCE)),
    f(20, "terminationMessagePolicy", Kind::Str),
    p(22, "startupProbe", Kind::Msg(PROBE)),
    p(24, "restartPolicy", Kind::Str),
];

const POD_SECURITY_CONTEXT: &[Field] = &[
    p(2, "runAsUser", Kind::Int64),
    p(3, "runAsNonRoot", Kind::Bool),
    p(5, "fsGroup", Kind::Int64),
    p(6, "runAsGroup", Kind::Int64),
];

const TOLERATION: &[Field] = &[
    f(1, "key", Kind::Str),
    f(2, "operator", Kind::Str),
    f(3, "value", Kind::Str),
    f(4, "effect", Kind::Str),
    p(5, "tolerationSeconds", Kind::Int64),
];

const POD_SPEC: &[Field] = &[
    f(1, "volumes", Kind::RepMsg(VOLUME)),
    r(2, "containers", Kind::RepMsg(CONTAINER)),
    f(3, "restartPolicy", Kind::Str),
    p(4, "terminationGracePeriodSeconds", Kind::Int64),
    p(5, "activeDeadlineSeconds", Kind::Int64),
    f(6, "dnsPolicy", Kind::Str),
    f(7, "nodeSelector", Kind::MapStr),
    f(8, "serviceAccountName", Kind::Str),
    f(9, "serviceAccount", Kind::Str),
    f(10, "nodeName", Kind::Str),
    f(11, "hostNetwork", Kind::Bool),
    f(12, "hostPID", Kind::Bool),
    f(13, "hostIPC", Kind::Bool),
    p(14, "securityContext", Kind::Msg(POD_SECURITY_CONTEXT)),
    f(15, "imagePullSecrets", Kind::RepMsg(LOCAL_OBJECT_REFERENCE)),
    f(16, "hostname", Kind::Str),
    f(17, "subdomain", Kind::Str),
    f(19, "schedulerName", Kind::Str),
    f(20, "initContainers", Kind::RepMsg(CONTAINER)),
    p(21, "automountServiceAccountToken", Kind::Bool),
    f(22, "tolerations", Kind::RepMsg(TOLERATION)),
    f(24, "priorityClassName", Kind::Str),
    p(25, "priority", Kind::Int32),
    p(27, "shareProcessNamespace", Kind::Bool),
    f(
        28,
        "readinessGates",
        Kind::RepMsg(&[r(1, "conditionType", Kind::Str)]),
    ),
    p(29, "runtimeClassName", Kind::Str),
    p(30, "enableServiceLinks", Kind::Bool),
    p(31, "preemptionPolicy", Kind::Str),
    f(32, "overhead", Kind::MapQuantity),
    p(35, "setHostnameAsFQDN", Kind::Bool),
    p(37, "hostUsers", Kind::Bool),
];

const POD_CONDITION: &[Field] = &[
    r(1, "type", Kind::Str),
    r(2, "status", Kind::Str),
    f(3, "lastProbeTime", Kind::Time),
    f(4, "lastTransitionTime", Kind::Time),
    f(5, "reason", Kind::Str),
    f(6, "message", Kind::Str),
    // 1.33+, a non-pointer there; absent in v1.24.
    p(7, "observedGeneration", Kind::Int64),
];

const CONTAINER_STATE: &[Field] = &[
    p(
        1,
        "waiting",
        Kind::Msg(&[f(1, "reason", Kind::Str), f(2, "message", Kind::Str)]),
    ),
    p(2, "running", Kind::Msg(&[f(1, "startedAt", Kind::Time)])),
    p(
        3,
        "terminated",
        Kind::Msg(&[
            r(1, "exitCode", Kind::Int32),
            f(2, "signal", Kind::Int32),
            f(3, "reason", Kind::Str),
            f(4, "message", Kind::Str),
            f(5, "startedAt", Kind::Time),
            f(6, "finishedAt", Kind::Time),
            f(7, "containerID", Kind::Str),
        ]),
    ),
];

const CONTAINER_STATUS: &[Field] = &[
    r(1, "name", Kind::Str),
    f(2, "state", Kind::Msg(CONTAINER_STATE)),
    f(3, "lastState", Kind::Msg(CONTAINER_STATE)),
    r(4, "ready", Kind::Bool),
    r(5, "restartCount", Kind::Int32),
    r(6, "image", Kind::Str),
    r(7, "imageID", Kind::Str),
    f(8, "containerID", Kind::Str),
    p(9, "started", Kind::Bool),
    p(11, "resources", Kind::Msg(RESOURCE_REQUIREMENTS)),
];

/// PodIP and HostIP.
const IP: &[Field] = &[f(1, "ip", Kind::Str)];

const POD_STATUS: &[Field] = &[
    f(1, "phase", Kind::Str),
    f(2, "conditions", Kind::RepMsg(POD_CONDITION)),
    f(3, "message", Kind::Str),
    f(4, "reason", Kind::Str),
    f(5, "hostIP", Kind::Str),
    f(6, "podIP", Kind::Str),
    p(7, "startTime", Kind::Time),
    f(8, "containerStatuses", Kind::RepMsg(CONTAINER_STATUS)),
    f(9, "qosClass", Kind::Str),
    f(10, "initContainerStatuses", Kind::RepMsg(CONTAINER_STATUS)),
    f(11, "nominatedNodeName", Kind::Str),
    f(12, "podIPs", Kind::RepMsg(IP)),
    // Newer than v1.24 (non-pointers there): written only when set here.
    p(14, "resize", Kind::Str),
    f(16, "hostIPs", Kind::RepMsg(IP)),
    p(17, "observedGeneration", Kind::Int64),
];

pub(crate) const POD: &[Field] = &[
    META,
    f(2, "spec", Kind::Msg(POD_SPEC)),
    f(3, "status", Kind::Msg(POD_STATUS)),
];

// ----------------------------------------------------------------- Node

const TAINT: &[Field] = &[
    r(1, "key", Kind::Str),
    f(2, "value", Kind::Str),
    r(3, "effect", Kind::Str),
    p(4, "timeAdded", Kind::Time),
];

const NODE_SPEC: &[Field] = &[
    f(1, "podCIDR", Kind::Str),
    f(2, "externalID", Kind::Str),
    f(3, "providerID", Kind::Str),
    f(4, "unschedulable", Kind::Bool),
    f(5, "taints", Kind::RepMsg(TAINT)),
    f(7, "podCIDRs", Kind::RepStr),
];

const NODE_CONDITION: &[Field] = &[
    r(1, "type", Kind::Str),
    r(2, "status", Kind::Str),
    f(3, "lastHeartbeatTime", Kind::Time),
    f(4, "lastTransitionTime", Kind::Time),
    f(5, "reason", Kind::Str),
    f(6, "message", Kind::Str),
];

const NODE_SYSTEM_INFO: &[Field] = &[
    r(1, "machineID", Kind::Str),
    r(2, "systemUUID", Kind::Str),
    r(3, "bootID", Kind::Str),
    r(4, "kernelVersion", Kind::Str),
    r(5, "osImage", Kind::Str),
    r(6, "containerRuntimeVersion", Kind::Str),
    r(7, "kubeletVersion", Kind::Str),
    r(8, "kubeProxyVersion", Kind::Str),
    r(9, "operatingSystem", Kind::Str),
    r(10, "architecture", Kind::Str),
];

const NODE_STATUS: &[Field] = &[
    f(1, "capacity", Kind::MapQuantity),
    f(2, "allocatable", Kind::MapQuantity),
    f(3, "phase", Kind::Str),
    f(4, "conditions", Kind::RepMsg(NODE_CONDITION)),
    f(
        5,
        "addresses",
        Kind::RepMsg(&[r(1, "type", Kind::Str), r(2, "address", Kind::Str)]),
    ),
    f(
        6,
        "daemonEndpoints",
        Kind::Msg(&[f(
            1,
            "kubeletEndpoint",
            // DaemonEndpoint's JSON name really is capitalised.
            Kind::Msg(&[r(1, "Port", Kind::Int32)]),
        )]),
    ),
    f(7, "nodeInfo", Kind::Msg(NODE_SYSTEM_INFO)),
    f(
        8,
        "images",
        Kind::RepMsg(&[r(1, "names", Kind::RepStr), f(2, "sizeBytes", Kind::Int64)]),
    ),
    f(9, "volumesInUse", Kind::RepStr),
    f(
        10,
        "volumesAttached",
        Kind::RepMsg(&[r(1, "name", Kind::Str), r(2, "devicePath", Kind::Str)]),
    ),
];

pub(crate) const NODE: &[Field] = &[
    META,
    f(2, "spec", Kind::Msg(NODE_SPEC)),
    f(3, "status", Kind::Msg(NODE_STATUS)),
];

// ------------------------------------------- Namespace, ConfigMap, Secret

pub(crate) const NAMESPACE: &[Field] = &[
    META,
    f(2, "spec", Kind::Msg(&[f(1, "finalizers", Kind::RepStr)])),
    f(
        3,
        "status",
        Kind::Msg(&[
            f(1, "phase", Kind::Str),
            f(
                2,
                "conditions",
                Kind::RepMsg(&[
                    r(1, "type", Kind::Str),
                    r(2, "status", Kind::Str),
                    f(4, "lastTransitionTime", Kind::Time),
                    f(5, "reason", Kind::Str),
                    f(6, "message", Kind::Str),
                ]),
            ),
        ]),
    ),
];

pub(crate) const CONFIG_MAP: &[Field] = &[
    META,
    f(2, "data", Kind::MapStr),
    f(3, "binaryData", Kind::MapBytes),
    p(4, "immutable", Kind::Bool),
];

pub(crate) const SECRET: &[Field] = &[
    META,
    f(2, "data", Kind::MapBytes),
    f(3, "type", Kind::Str),
    f(4, "stringData", Kind::MapStr),
    p(5, "immutable", Kind::Bool),
];

pub(crate) const SERVICE_ACCOUNT: &[Field] = &[
    META,
    f(2, "secrets", Kind::RepMsg(OBJECT_REFERENCE)),
    f(3, "imagePullSecrets", Kind::RepMsg(LOCAL_OBJECT_REFERENCE)),
    p(4, "automountServiceAccountToken", Kind::Bool),
];

/// pods/binding: what a scheduler POSTs.
pub(crate) const BINDING: &[Field] = &[META, r(2, "target", Kind::Msg(OBJECT_REFERENCE))];

// -------------------------------------------------------------- Service

const SERVICE_PORT: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "protocol", Kind::Str),
    r(3, "port", Kind::Int32),
    f(4, "targetPort", Kind::IntOrString),
    f(5, "nodePort", Kind::Int32),
    p(6, "appProtocol", Kind::Str),
];

const SERVICE_SPEC: &[Field] = &[
    f(1, "ports", Kind::RepMsg(SERVICE_PORT)),
    f(2, "selector", Kind::MapStr),
    f(3, "clusterIP", Kind::Str),
    f(4, "type", Kind::Str),
    f(5, "externalIPs", Kind::RepStr),
    f(7, "sessionAffinity", Kind::Str),
    f(8, "loadBalancerIP", Kind::Str),
    f(9, "loadBalancerSourceRanges", Kind::RepStr),
    f(10, "externalName", Kind::Str),
    f(11, "externalTrafficPolicy", Kind::Str),
    f(12, "healthCheckNodePort", Kind::Int32),
    f(13, "publishNotReadyAddresses", Kind::Bool),
    p(
        14,
        "sessionAffinityConfig",
        Kind::Msg(&[p(
            1,
            "clientIP",
            Kind::Msg(&[p(1, "timeoutSeconds", Kind::Int32)]),
        )]),
    ),
    p(17, "ipFamilyPolicy", Kind::Str),
    f(18, "clusterIPs", Kind::RepStr),
    f(19, "ipFamilies", Kind::RepStr),
    p(20, "allocateLoadBalancerNodePorts", Kind::Bool),
    p(21, "loadBalancerClass", Kind::Str),
    p(22, "internalTrafficPolicy", Kind::Str),
    p(23, "trafficDistribution", Kind::Str),
];

const LOAD_BALANCER_INGRESS: &[Field] = &[
    f(1, "ip", Kind::Str),
    f(2, "hostname", Kind::Str),
    p(3, "ipMode", Kind::Str),
    f(
        4,
        "ports",
        Kind::RepMsg(&[
            r(1, "port", Kind::Int32),
            r(2, "protocol", Kind::Str),
            p(3, "error", Kind::Str),
        ]),
    ),
];

const SERVICE_STATUS: &[Field] = &[
    f(
        1,
        "loadBalancer",
        Kind::Msg(&[f(1, "ingress", Kind::RepMsg(LOAD_BALANCER_INGRESS))]),
    ),
    f(2, "conditions", Kind::RepMsg(CONDITION)),
];

pub(crate) const SERVICE: &[Field] = &[
    META,
    f(2, "spec", Kind::Msg(SERVICE_SPEC)),
    f(3, "status", Kind::Msg(SERVICE_STATUS)),
];
