"""Operations on a running balancer: statistics, flow explain, drain, doctor."""
