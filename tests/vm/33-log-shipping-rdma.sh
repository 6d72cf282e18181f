#!/bin/bash
# Test 32 (three log-shipping sources and a destination) with the links over RDMA
# (Soft-RoCE): the sources' records land in the destination's NVRAM areas by RDMA writes.
# In CI it stops after the first consistency point (about 2 minutes under TCG; the steps
# after it are above the transport and run in test 32); NVM_SOAK=1 runs all of test 32.
# vm-timeout: 420
NVM_TRANSPORT=rdma exec bash "$NVM_REPO/tests/vm/32-log-shipping.sh"
