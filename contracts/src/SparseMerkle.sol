// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// @title SparseMerkle
/// @notice The state tree's proofs, as rollup/src/smt.rs defines them: depth 32,
/// keccak256(left ‖ right), empty subtrees precomputed, a uint32 bitmap of the carried
/// siblings. Shared by the step verifier (fraud proofs) and the settlement contract
/// (withdrawals and exits), so there is one implementation to trust.
library SparseMerkle {
    /// A proof's bitmap announces a different number of siblings than it carries.
    error MalformedProof(uint256 announced, uint256 carried);

    /// EMPTY[h] for h = 0..31: the root of an empty subtree of height h.
    bytes internal constant EMPTY =
        hex"0000000000000000000000000000000000000000000000000000000000000000" // EMPTY[0]
        hex"ad3228b676f7d3cd4284a5443f17f1962b36e491b30a40b2405849e597ba5fb5" // EMPTY[1]
        hex"b4c11951957c6f8f642c4af61cd6b24640fec6dc7fc607ee8206a99e92410d30" // EMPTY[2]
        hex"21ddb9a356815c3fac1026b6dec5df3124afbadb485c9ba5a3e3398a04b7ba85" // EMPTY[3]
        hex"e58769b32a1beaf1ea27375a44095a0d1fb664ce2dd358e7fcbfb78c26a19344" // EMPTY[4]
        hex"0eb01ebfc9ed27500cd4dfc979272d1f0913cc9f66540d7e8005811109e1cf2d" // EMPTY[5]
        hex"887c22bd8750d34016ac3c66b5ff102dacdd73f6b014e710b51e8022af9a1968" // EMPTY[6]
        hex"ffd70157e48063fc33c97a050f7f640233bf646cc98d9524c6b92bcf3ab56f83" // EMPTY[7]
        hex"9867cc5f7f196b93bae1e27e6320742445d290f2263827498b54fec539f756af" // EMPTY[8]
        hex"cefad4e508c098b9a7e1d8feb19955fb02ba9675585078710969d3440f5054e0" // EMPTY[9]
        hex"f9dc3e7fe016e050eff260334f18a5d4fe391d82092319f5964f2e2eb7c1c3a5" // EMPTY[10]
        hex"f8b13a49e282f609c317a833fb8d976d11517c571d1221a265d25af778ecf892" // EMPTY[11]
        hex"3490c6ceeb450aecdc82e28293031d10c7d73bf85e57bf041a97360aa2c5d99c" // EMPTY[12]
        hex"c1df82d9c4b87413eae2ef048f94b4d3554cea73d92b0f7af96e0271c691e2bb" // EMPTY[13]
        hex"5c67add7c6caf302256adedf7ab114da0acfe870d449a3a489f781d659e8becc" // EMPTY[14]
        hex"da7bce9f4e8618b6bd2f4132ce798cdc7a60e7e1460a7299e3c6342a579626d2" // EMPTY[15]
        hex"2733e50f526ec2fa19a22b31e8ed50f23cd1fdf94c9154ed3a7609a2f1ff981f" // EMPTY[16]
        hex"e1d3b5c807b281e4683cc6d6315cf95b9ade8641defcb32372f1c126e398ef7a" // EMPTY[17]
        hex"5a2dce0a8a7f68bb74560f8f71837c2c2ebbcbf7fffb42ae1896f13f7c7479a0" // EMPTY[18]
        hex"b46a28b6f55540f89444f63de0378e3d121be09e06cc9ded1c20e65876d36aa0" // EMPTY[19]
        hex"c65e9645644786b620e2dd2ad648ddfcbf4a7e5b1a3a4ecfe7f64667a3f0b7e2" // EMPTY[20]
        hex"f4418588ed35a2458cffeb39b93d26f18d2ab13bdce6aee58e7b99359ec2dfd9" // EMPTY[21]
        hex"5a9c16dc00d6ef18b7933a6f8dc65ccb55667138776f7dea101070dc8796e377" // EMPTY[22]
        hex"4df84f40ae0c8229d0d6069e5c8f39a7c299677a09d367fc7b05e3bc380ee652" // EMPTY[23]
        hex"cdc72595f74c7b1043d0e1ffbab734648c838dfb0527d971b602bc216c9619ef" // EMPTY[24]
        hex"0abf5ac974a1ed57f4050aa510dd9c74f508277b39d7973bb2dfccc5eeb0618d" // EMPTY[25]
        hex"b8cd74046ff337f0a7bf2c8e03e10f642c1886798d71806ab1e888d9e5ee87d0" // EMPTY[26]
        hex"838c5655cb21c6cb83313b5a631175dff4963772cce9108188b34ac87c81c41e" // EMPTY[27]
        hex"662ee4dd2dd7b2bc707961b1e646c4047669dcb6584f0d8d770daf5d7e7deb2e" // EMPTY[28]
        hex"388ab20e2573d171a88108e79d820e98f26c0b84aa8b2f4aa4968dbb818ea322" // EMPTY[29]
        hex"93237c50ba75ee485f4c22adf2f741400bdf8d6a9cc7df7ecae576221665d735" // EMPTY[30]
        hex"8448818bb4ae4562849e949e17ac16e0be16688e156b5cf15e098c627c0056a9"; // EMPTY[31]

    /// The root that `leaf` at `index` implies under the proof (`bitmap`, `siblings`).
    function root(uint32 index, bytes32 leaf, uint32 bitmap, bytes32[] calldata siblings)
        internal
        pure
        returns (bytes32 r)
    {
        uint256 announced = popcount(bitmap);
        if (announced != siblings.length) revert MalformedProof(announced, siblings.length);
        (r,) = roots(index, leaf, leaf, bitmap, siblings);
    }

    /// The roots that leaves `a` and `b` at `index` imply under one proof (`b`'s path
    /// is hashed only when it differs from `a`). The caller has checked that the bitmap
    /// announces exactly `siblings.length` siblings.
    function roots(
        uint32 index,
        bytes32 a,
        bytes32 b,
        uint32 bitmap,
        bytes32[] calldata siblings
    ) internal pure returns (bytes32, bytes32) {
        bytes memory empty = EMPTY;
        assembly ("memory-safe") {
            let same := eq(a, b)
            let p := siblings.offset
            let e := add(empty, 32)
            for { let h := 0 } lt(h, 32) { h := add(h, 1) } {
                let s
                switch and(shr(h, bitmap), 1)
                case 0 { s := mload(add(e, shl(5, h))) }
                default {
                    s := calldataload(p)
                    p := add(p, 32)
                }
                switch and(shr(h, index), 1)
                case 0 {
                    mstore(0x00, a)
                    mstore(0x20, s)
                    a := keccak256(0x00, 0x40)
                    if iszero(same) {
                        mstore(0x00, b)
                        b := keccak256(0x00, 0x40)
                    }
                }
                default {
                    mstore(0x00, s)
                    mstore(0x20, a)
                    a := keccak256(0x00, 0x40)
                    if iszero(same) {
                        mstore(0x20, b)
                        b := keccak256(0x00, 0x40)
                    }
                }
            }
            if same { b := a }
        }
        return (a, b);
    }

    /// Set bits in a u32.
    function popcount(uint256 x) internal pure returns (uint256) {
        unchecked {
            x = x - ((x >> 1) & 0x55555555);
            x = (x & 0x33333333) + ((x >> 2) & 0x33333333);
            x = (x + (x >> 4)) & 0x0F0F0F0F;
            return ((x * 0x01010101) & 0xFFFFFFFF) >> 24;
        }
    }

}
