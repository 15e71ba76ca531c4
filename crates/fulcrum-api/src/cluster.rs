//! This node's place in the controller cluster. Every operation that only the leader may
//! perform (uploads, image deletion) asks [`require_leader`], and nothing else decides it.

use axum::http::StatusCode;

use crate::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeRole {
    Leader,
    /// A member that follows the leader at this address (`https://10.0.0.1:9443`).
    Follower {
        leader: String,
    },
}

/// Refuses the request on a follower, naming the leader so the client knows where to go.
pub fn require_leader(role: &NodeRole, what: &str) -> Result<(), ApiError> {
    match role {
        NodeRole::Leader => Ok(()),
        NodeRole::Follower { leader } => Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            format!("{what} is accepted only on the cluster leader, at {leader}; this node is a follower"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_name_the_leader() {
        assert!(require_leader(&NodeRole::Leader, "An upload").is_ok());
        let err =
            require_leader(&NodeRole::Follower { leader: "https://10.0.0.1:9443".into() }, "An upload").unwrap_err();
        assert_eq!(err.status, StatusCode::MISDIRECTED_REQUEST);
        assert!(err.message.contains("https://10.0.0.1:9443"), "{}", err.message);
    }
}
