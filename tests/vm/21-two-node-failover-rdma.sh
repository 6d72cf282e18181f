#!/bin/bash
# The two-node acid test (20-two-node-failover) with the mirror link over RDMA (Soft-RoCE).
# vm-timeout: 600
NVM_TRANSPORT=rdma exec bash "$NVM_REPO/tests/vm/20-two-node-failover.sh"
