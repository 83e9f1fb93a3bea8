// The LD7 spec's Node.js example (Example 2), unchanged but for where it points.
//
// Run against a local botvisor:
//   npm install --prefix examples        (installs axios)
//   BOTVISOR_URL=http://localhost:8000 API_KEY=your_api_key_here node examples/create_bot.js
const axios = require('axios');

const BASE_URL = process.env.BOTVISOR_URL || 'http://localhost:8000';
const API_KEY = process.env.API_KEY || 'your_api_key_here';
const USER_ID = process.env.BOT_USER_ID || 'example_node';
const PHONE = process.env.BOT_PHONE || '1234567890';

async function createBot() {
  try {
    const response = await axios.post(`${BASE_URL}/api/sessions`, {
      userId: USER_ID,
      phoneNumber: PHONE
    }, {
      headers: {
        'Content-Type': 'application/json',
        'X-API-Key': API_KEY
      }
    });

    console.log('Pairing Code:', response.data.pairingCode);
    console.log('Enter this code in WhatsApp');
  } catch (error) {
    console.error('Error:', error.response ? error.response.data : error.message);
    process.exitCode = 1;
  }
}

createBot();
