#!/bin/bash
# Test 32 (three log-shipping sources and a destination) with the links over RDMA
# (Soft-RoCE): the sources' records land in the destination's NVRAM areas by RDMA writes.
# vm-timeout: 420
NVM_TRANSPORT=rdma exec bash "$NVM_REPO/tests/vm/32-log-shipping.sh"
