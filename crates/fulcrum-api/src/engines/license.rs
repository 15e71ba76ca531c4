//! Who holds license cores: pure, so the rules can be tested without a controller.
//!
//! SEs that hold cores keep them while the license allows (in the order they joined); the
//! rest take what is left in the order they joined. An SE either gets all the cores it asked
//! for or none (it is then unlicensed).

/// One SE's claim, in join order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<'a> {
    pub se: &'a str,
    pub cores: u64,
    pub holds: bool,
}

/// The SEs that are licensed under `total` cores (by index into `claims`).
pub fn allocate(total: u64, claims: &[Claim<'_>]) -> Vec<bool> {
    let mut licensed = vec![false; claims.len()];
    let mut left = total;
    for pass_holders in [true, false] {
        for (i, claim) in claims.iter().enumerate() {
            if claim.holds == pass_holders && !licensed[i] && claim.cores <= left {
                licensed[i] = true;
                left -= claim.cores;
            }
        }
    }
    licensed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(se: &str, cores: u64, holds: bool) -> Claim<'_> {
        Claim { se, cores, holds }
    }

    #[test]
    fn join_order_decides_until_the_cores_run_out() {
        let claims = [claim("a", 4, false), claim("b", 4, false), claim("c", 2, false)];
        assert_eq!(allocate(8, &claims), [true, true, false]);
        assert_eq!(allocate(6, &claims), [true, false, true], "a smaller claim still fits");
        assert_eq!(allocate(0, &claims), [false, false, false]);
    }

    #[test]
    fn holders_keep_their_cores_before_newcomers() {
        // c already holds its cores; a license cut to 4 keeps c and then fits a.
        let claims = [claim("a", 2, false), claim("b", 4, false), claim("c", 2, true)];
        assert_eq!(allocate(4, &claims), [true, false, true]);
        // More cores: the waiting SE gets them.
        assert_eq!(allocate(8, &claims), [true, true, true]);
    }
}
