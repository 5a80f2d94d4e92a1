//! The lanes (which requests take which connections), the forwarding
//! lanes' caps and the unary lane's protocol, as configured, and the fixed
//! caps of the hub's and the proxy's own lanes.

use std::time::Duration;

/// The caps of the forwarding lanes (`--upstream-max-connections-*`,
/// `--upstream-stream-wait`), and the unary lane's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lanes {
    pub unary: LaneLimits,
    pub long_running: LaneLimits,
    pub exempt: LaneLimits,
    /// `--upstream-unary-protocol`.
    pub unary_protocol: UnaryProtocol,
}

/// How unary requests (neither long-running nor exempt) reach the
/// apiserver (`--upstream-unary-protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UnaryProtocol {
    /// HTTP/1.1 keep-alive connections, one request on each at a time (up
    /// to 250 connections per `--upstream-max-connections-unary`).
    #[default]
    Http1,
    /// Multiplexed over HTTP/2 connections (250 streams each), like the
    /// other lanes.
    Http2,
}

impl Default for Lanes {
    fn default() -> Self {
        let wait = Duration::from_secs(1);
        Lanes {
            // 8 × 250 concurrent unary requests: more than an apiserver's
            // --max-requests-inflight plus --max-mutating-requests-inflight.
            unary: LaneLimits {
                max_connections: 8,
                wait,
            },
            // 64 × 250 = 16,000 forwarded watches and follows.
            long_running: LaneLimits {
                max_connections: 64,
                wait,
            },
            exempt: LaneLimits {
                max_connections: 8,
                wait,
            },
            unary_protocol: UnaryProtocol::default(),
        }
    }
}

/// The hub's lane: its shared streams are O(collections watched), never
/// O(clients), so 4 × 250 streams is far more than it opens; having them
/// to itself, it never waits behind forwarded watches.
pub(super) const HUB_LANE: LaneLimits = LaneLimits {
    max_connections: 4,
    wait: Duration::from_secs(5),
};

/// The proxy's own lane: TokenReviews, SubjectAccessReviews, probes.
pub(super) const OWN_LANE: LaneLimits = LaneLimits {
    max_connections: 4,
    wait: Duration::from_secs(5),
};

/// The connections a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Requests that end on their own (GET, LIST, PATCH, …).
    Unary,
    /// Watches, `logs -f`, proxy and other long-running requests.
    LongRunning,
    /// Requests admitted by an exempt rule of the limits file: the path the
    /// rollback takes, whatever the fleet holds.
    Exempt,
    /// The watch hub's shared streams and their LISTs: never starved by
    /// forwarded watches, whose number clients choose.
    Hub,
    /// The proxy's own requests (TokenReview, SubjectAccessReview, probes).
    Own,
}

impl Lane {
    /// Every lane, in the order views list them.
    pub const ALL: [Lane; 5] = [
        Lane::Unary,
        Lane::LongRunning,
        Lane::Exempt,
        Lane::Hub,
        Lane::Own,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Unary => "unary",
            Lane::LongRunning => "long-running",
            Lane::Exempt => "exempt",
            Lane::Hub => "hub",
            Lane::Own => "own",
        }
    }

    /// The lane of a client request.
    pub fn of(long_running: bool, exempt: bool) -> Lane {
        match (exempt, long_running) {
            (true, _) => Lane::Exempt,
            (false, true) => Lane::LongRunning,
            (false, false) => Lane::Unary,
        }
    }
}

/// How large a lane may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneLimits {
    /// HTTP/2 connections the lane may open (each carries as many streams
    /// as the apiserver allows, 250 by default).
    pub max_connections: usize,
    /// How long a request waits for a stream when every connection is full
    /// and the lane is at its cap, before it is refused.
    pub wait: Duration,
}

/// A snapshot of a lane, for tests and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaneStats {
    pub connections: usize,
    pub streams: usize,
}

/// Pre-registered metric handles of one lane.
pub(super) struct LaneMetrics {
    pub connections: metrics::Gauge,
    pub streams: metrics::Gauge,
    pub waiting: metrics::Gauge,
    pub saturated: metrics::Counter,
}

impl LaneMetrics {
    pub fn new(lane: Lane) -> LaneMetrics {
        let l = lane.as_str();
        LaneMetrics {
            connections: metrics::gauge!("breakwater_upstream_connections", "lane" => l),
            streams: metrics::gauge!("breakwater_upstream_streams_in_use", "lane" => l),
            waiting: metrics::gauge!("breakwater_upstream_stream_waiters", "lane" => l),
            saturated: metrics::counter!("breakwater_upstream_saturated_total", "lane" => l),
        }
    }
}
